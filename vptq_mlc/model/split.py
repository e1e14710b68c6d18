"""Per-layer functions for splitting the decoder layers over several devices (`vptq-mlc compile --split-functions`).

Design (docs/ARCHITECTURE.md, "Layer split across the GPUs of one host"): the one library gets, next to its usual
functions, functions that each take only their own weights, and the runtime chooses the partition at load time:

- `split_embed(input_ids, [embed weight])`;
- per *layer group* (layers whose parameters have identical shapes, dtypes and VPTQ configs; a uniform model has
  one group): `split_layer_prefill_g<k>(hidden[1, n, H], kv, layer_id, [that layer's weights])`,
  `split_layer_decode_g<k>` (symbolic batch) and `split_layer_decode_b<n>_g<k>` (static batch n: 1 and the target's
  static decode batches, so GPU decode gets the GEMV kernels exactly as `decode` / `batch_decode_b<n>` do);
  `layer_id` is a runtime argument, so the function count does not grow with the number of layers (a 126-layer model
  compiles one group, not 126 copies). Weights cannot be stacked and indexed by layer id instead, because VPTQ
  layers may differ in codebook shapes;
- `split_head_prefill(hidden, logit_positions, [norm, lm_head])`, `split_head_decode[_b<n>]`;
- `create_tir_paged_kv_cache_stage(..., layer_begin, layer_end)`: a cache holding only layers [begin, end) that
  accepts their global layer ids (TVM's cache subtracts `layer_partition[0]` when not in a disco worker).

The functions run the same ops in the same order as the single-device ones (the final norm moves into the head,
where `batch_prefill` also applies it before the logit gather), so greedy tokens match the single-device run.
`_metadata["split"]` (built here) tells the runtime the function names and each function's parameter names.

Exporting uses nn's exporter internals (`_emit_method`, as `nn.Module.export_tvm` does) with a parameter list per
function: `export_tvm` always passes every parameter of the module, which would put all weights on every device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tvm import relax as rx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.exporter import Exporter, _emit_method
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from vptq_mlc.model.decoder import DecoderForCausalLM, _gather_positions

SPLIT_VERSION = 1
LAYER_PREFIX = "model.layers.{layer}."
KV_STAGE_FUNCTION = "create_tir_paged_kv_cache_stage"
_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
Params = list[tuple[str, nn.Parameter]]


def _layer_signature(layer: nn.Module) -> tuple:
    """Layers with equal signatures compile to the same functions (only the layer id and the weights differ)."""
    shapes = tuple((n, tuple(int(d) for d in p.shape), p.dtype) for n, p in layer.named_parameters())
    cfgs = []
    for path in _LINEARS:
        m: Any = layer
        for part in path.split("."):
            m = getattr(m, part)
        cfgs.append(getattr(m, "cfg", None))
    return shapes, tuple(cfgs)


def _method(name: str, fn: Callable[..., Any], spec: dict[str, Any],
            params: Params) -> tuple[str, nn.spec.MethodSpec, Params]:
    return name, nn.spec.MethodSpec.from_raw(dict(spec), fn), params


def split_methods(model: DecoderForCausalLM) -> tuple[list[tuple[str, nn.spec.MethodSpec, Params]], dict[str, Any]]:
    """The split functions (name, spec, own parameters) and the `_metadata["split"]` entry describing them."""
    cfg, dtype, h = model.cfg, model.dtype, model.cfg.hidden_size
    packed = {"param_mode": "packed", "effect_mode": "none"}
    kv = nn.spec.Object(object_type=PagedKVCache)
    batches = (1, *model.static_decode_batches)
    methods: list[tuple[str, nn.spec.MethodSpec, Params]] = []

    embed_params = [("model.embed_tokens.weight", model.model.embed_tokens.weight)]
    methods.append(_method("split_embed", lambda input_ids: model.embed(input_ids),
                           {"input_ids": nn.spec.Tensor(["seq_len"], "int32"), "$": packed}, embed_params))

    groups: list[dict[str, Any]] = []
    signatures: dict[tuple, int] = {}
    group_of_layer = []
    for layer in model.model.layers:
        sig = _layer_signature(layer)
        if sig not in signatures:
            g = signatures[sig] = len(groups)
            params = list(layer.named_parameters())

            def run(hidden: Tensor, kv: PagedKVCache, layer_id: Any, _layer: nn.Module = layer) -> Tensor:
                return _layer(hidden, kv, layer_id)

            names = {"prefill": f"split_layer_prefill_g{g}", "decode": f"split_layer_decode_g{g}",
                     "decode_static": {str(n): f"split_layer_decode_b{n}_g{g}" for n in batches}}
            shapes = [(names["prefill"], [1, "seq_len", h]), (names["decode"], ["batch_size", 1, h])]
            shapes += [(names["decode_static"][str(n)], [n, 1, h]) for n in batches]
            for fname, shape in shapes:
                methods.append(_method(fname, run, {"hidden": nn.spec.Tensor(shape, dtype), "kv": kv,
                                                    "layer_id": int, "$": packed}, params))
            groups.append({**names, "params": [n for n, _ in params]})
        group_of_layer.append(signatures[sig])

    head_params = [("model.norm.weight", model.model.norm.weight)]
    head_params.append(("model.embed_tokens.weight", model.model.embed_tokens.weight) if model.lm_head is None
                       else ("lm_head.weight", model.lm_head.weight))

    def head_prefill(hidden: Tensor, logit_positions: Tensor) -> Tensor:
        hidden = op.tensor_expr_op(_gather_positions, "gather_positions", [model.model.norm(hidden), logit_positions])
        return model._logits(hidden)

    def head_decode(hidden: Tensor) -> Tensor:
        return model._logits(model.model.norm(hidden))

    head = {"prefill": "split_head_prefill", "decode": "split_head_decode",
            "decode_static": {str(n): f"split_head_decode_b{n}" for n in batches}}
    methods.append(_method(head["prefill"], head_prefill,
                           {"hidden": nn.spec.Tensor([1, "seq_len", h], dtype),
                            "logit_positions": nn.spec.Tensor(["batch_size"], "int32"), "$": packed}, head_params))
    methods.append(_method(head["decode"], head_decode,
                           {"hidden": nn.spec.Tensor(["batch_size", 1, h], dtype), "$": packed}, head_params))
    for n in batches:
        methods.append(_method(head["decode_static"][str(n)], head_decode,
                               {"hidden": nn.spec.Tensor([n, 1, h], dtype), "$": packed}, head_params))

    ints = ("max_batch_size", "max_total_seq_len", "prefill_chunk_size", "page_size", "support_sliding_window",
            "layer_begin", "layer_end")
    methods.append(_method(KV_STAGE_FUNCTION, model.create_tir_paged_kv_cache,
                           {**{k: int for k in ints}, "$": {"param_mode": "none", "effect_mode": "none"}}, []))

    meta = {
        "version": SPLIT_VERSION,
        "num_layers": cfg.num_hidden_layers,
        "kv_cache": KV_STAGE_FUNCTION,
        "embed": {"function": "split_embed", "params": [n for n, _ in embed_params]},
        "head": {**head, "params": [n for n, _ in head_params]},
        "layer_prefix": LAYER_PREFIX,
        "layer_groups": groups,
        "group_of_layer": group_of_layer,
    }
    return methods, meta


def export_with_split(model: DecoderForCausalLM, spec: nn.spec.ModuleSpec) -> tuple[Any, Params, dict[str, Any]]:
    """`model.export_tvm(spec)` plus the split functions in the same IRModule (shared kernels are added once).

    Returns (IRModule, all parameters in `export_tvm`'s order, the `_metadata["split"]` entry)."""
    extra, meta = split_methods(model)
    exporter = Exporter(debug=False)
    all_params: Params = []
    bb = exporter.builder
    num_layers = model.cfg.num_hidden_layers

    def kv_whole(*sizes: Any) -> PagedKVCache:
        # The whole-model cache = the stage cache over layers [0, L). Constructing TIRPagedKVCache twice would add
        # its attention kernels twice under the same global symbols (they are not deduplicated: TVM's structural
        # equality fails on them), so the plain function calls the stage one.
        args = [rx.ShapeExpr([v]) for v in sizes] + [rx.ShapeExpr([0]), rx.ShapeExpr([num_layers])]
        return PagedKVCache(_expr=bb.emit(rx.Call(bb.get().get_global_var(KV_STAGE_FUNCTION), args)),
                            _name="paged_kv_cache")

    items = [m for m in extra if m[0] == KV_STAGE_FUNCTION]
    for n, s in zip(spec.method_names, spec.method_specs):
        if n == "create_tir_paged_kv_cache":
            s = nn.spec.MethodSpec(kv_whole, s.arg_names[: len(s.arg_specs)], s.arg_specs, "none", "none")
        items.append((n, s, None))
    items += [m for m in extra if m[0] != KV_STAGE_FUNCTION]
    with exporter:
        for name, method_spec, own in items:
            params = list(model.named_parameters()) if own is None else own
            if own is None:
                all_params = params
            with exporter.builder.function(name, attrs={"num_input": len(method_spec.arg_specs)}):
                with exporter.builder.dataflow():
                    outputs, inputs = _emit_method(exporter.builder, method_spec, params, [])
                exporter.builder.emit_func_output(outputs, inputs)
    mod = exporter.builder.finalize()
    rx.analysis.well_formed(mod)
    return mod, all_params, meta
