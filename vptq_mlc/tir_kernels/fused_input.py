"""What the fused decode GEMV computes around the VQ product, as plain data: the GPU host's check runner
(`bench/kernels.py`, runtime-only TVM, no TVMScript) builds these for its references without importing the kernels."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FusedInput:
    """What the fused GEMV (`vq_gemv_cuda(..., prologue=...)`) computes around the VQ product.

    source: the activation from the kernel's input(s): "x" as given; "rmsnorm": RMSNorm(x) * gamma (`eps`), the
    decoder's pre-norm folded in; "swiglu": silu(x) * x2 (gate, up), the MLP's product folded into down_proj.
    residual: y = vq(..) + dot + residual (one layer only): the residual stream's add in the epilogue.
    concat: the layers' outputs side by side in one [rows, count * O] tensor (q/k/v of one shape: no concat)."""

    source: str = "x"
    eps: float = 0.0
    residual: bool = False
    concat: bool = False


PLAIN_INPUT = FusedInput()  # the activation as given, no residual, one output per layer
