"""`build_model`: the module tree for one converted model, with VPTQLinear where the checkpoint is quantized."""

from __future__ import annotations

from collections.abc import Mapping

from tvm.relax.frontend import nn
from tvm.target import Target

from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig
from vptq_mlc.errors import CheckpointError
from vptq_mlc.model.config import DecoderConfig
from vptq_mlc.model.decoder import DecoderForCausalLM
from vptq_mlc.model.vptq_linear import VPTQLinear
from vptq_mlc.tir_kernels.registry import KernelSelector, NormBiasKernels


def build_model(
    cfg: DecoderConfig,
    layers: Mapping[str, VPTQLayerConfig],
    dtype: str,
    target: Target,
    select_kernel: KernelSelector,
    static_decode_batches: tuple[int, ...] = (),
    select_norm_bias: NormBiasKernels | None = None,
) -> DecoderForCausalLM:
    """The module tree: linears listed in `layers` become VPTQLinear, the rest dense nn.Linear."""

    def make_linear(path: str, in_f: int, out_f: int, bias: bool) -> nn.Module:
        qcfg = layers.get(path)
        if qcfg is None:
            return nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
        if (qcfg.in_features, qcfg.out_features) != (in_f, out_f):
            raise CheckpointError(
                f"layer {path}: quantized shape {qcfg.out_features}x{qcfg.in_features} does not match the "
                f"architecture's {out_f}x{in_f}"
            )
        if bias and not qcfg.bias:
            raise CheckpointError(f"layer {path}: the architecture needs a bias but the VPTQ layer has none")
        return VPTQLinear(qcfg, dtype, select_kernel, select_norm_bias)

    return DecoderForCausalLM(cfg, make_linear, dtype, target, static_decode_batches)
