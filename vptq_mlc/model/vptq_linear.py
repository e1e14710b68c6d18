"""`VPTQLinear`: an nn.Module whose weight exists only as codes + codebooks (layout `generic`, plus the
`code-sorted` entries where the target's kernel registry uses them).

The permutation and the norm scale are applied to the activation (a gather and a multiply over `in_features`
values, once per call) and the norm bias becomes one dot product per row, so the kernel never materializes a
dense weight: `y = vq_matmul(x[:, perm] * col_scale) + x @ weight_bias + bias` (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from tvm import te
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from vptq_mlc.checkpoint.layer_config import VPTQLayerConfig
from vptq_mlc.tir_kernels.fused_input import PLAIN_INPUT, FusedInput
from vptq_mlc.tir_kernels.registry import KernelSelector, NormBiasKernels


class VPTQLinear(nn.Module):
    """Drop-in for `nn.Linear(in_features, out_features, bias)` holding a VPTQ-quantized weight."""

    def __init__(self, cfg: VPTQLayerConfig, dtype: str, select_kernel: KernelSelector,
                 select_norm_bias: NormBiasKernels | None = None, codebook_dtype: str | None = None):
        """`codebook_dtype`: the codebooks' stored dtype when narrower than `dtype` (the kernel widens entries)."""
        super().__init__()
        self.cfg = cfg
        self.in_features, self.out_features = cfg.in_features, cfg.out_features
        self._select_kernel, self._select_norm_bias = select_kernel, select_norm_bias
        # every operand any of the target's kernels for this layer reads (the registry decides, per row count)
        for name, (shape, dt) in select_kernel.operand_shapes(cfg, dtype).items():
            float_dtype = codebook_dtype or dtype if name.endswith("centroids") else dtype
            setattr(self, name, nn.Parameter(shape, float_dtype if dt == "float" else dt))
        self.perm = nn.Parameter((cfg.in_features,), "int32") if cfg.enable_perm else None
        self.col_scale = nn.Parameter((cfg.in_features,), dtype) if cfg.enable_norm else None
        self.weight_bias = nn.Parameter((cfg.in_features,), dtype) if cfg.enable_norm else None
        self.bias = nn.Parameter((cfg.out_features,), dtype) if cfg.bias else None
        self.dtype = dtype

    def _permute_and_scale(self, x2: nn.Tensor) -> nn.Tensor:
        """`x2[:, perm] * col_scale` as one gather (a TE op: relax's take would warn about unchecked indices)."""
        if self.perm is None:
            return x2 * self.col_scale if self.col_scale is not None else x2

        def gather(x: te.Tensor, perm: te.Tensor, *scale: te.Tensor) -> te.Tensor:
            def at(b: Any, k: Any) -> Any:
                v = x[b, perm[k]]
                return v * scale[0][k] if scale else v

            return te.compute(x.shape, at, name="vq_permute")

        args = [x2, self.perm] + ([self.col_scale] if self.col_scale is not None else [])
        return op.tensor_expr_op(gather, "vq_permute", args)

    @property
    def prologue_kernel_used(self) -> bool:
        """Whether the activation side runs as the target's prologue kernel (a normed layer on CUDA)."""
        nb = self._select_norm_bias
        return self.weight_bias is not None and nb is not None and nb.prologue is not None

    def prologue_operands(self) -> list[nn.Tensor]:
        """This layer's operands of the prologue kernel, in its order: [perm], col_scale, weight_bias."""
        return ([self.perm] if self.perm is not None else []) + [self.col_scale, self.weight_bias]

    def _flatten(self, x: nn.Tensor) -> tuple[list[Any], Any, nn.Tensor]:
        lead = list(x.shape[:-1])
        rows = 1
        for d in lead:
            rows = rows * d
        return lead, rows, op.reshape(x, [rows, self.in_features])

    def fused_kernel(self, rows: Any, opts: FusedInput = PLAIN_INPUT):
        """The target's one-launch kernel for this layer at `rows` (activation side folded into the VQ kernel, plus
        `opts`' neighbours), or None (then prologue kernel + VQ kernel)."""
        if not self.prologue_kernel_used or not isinstance(rows, int):
            return None
        return self._select_kernel.fused(self.cfg, self.dtype, rows, (self.perm is not None,), opts)

    def folded_kernel(self, rows: Any, residual: bool = False):
        """The target's kernel for the whole linear at a symbolic row count with the prologue folded in for long
        prompts (`KernelSelector.folded`; `VQKernel.fold_from_rows`; `residual`: one that adds a residual too), or
        None (then prologue + VQ kernel + `finish`)."""
        if not self.prologue_kernel_used or isinstance(rows, int):
            return None
        return self._select_kernel.folded(self.cfg, self.dtype, self.bias is not None, residual)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        lead, rows, x2 = self._flatten(x)
        kernel = self.fused_kernel(rows)
        if kernel is not None:
            (y,) = _call_fused([self], kernel, [x2], rows)
            return self.finish(y, lead, rows, x2, None, dot_added=True)
        folded = self.folded_kernel(rows)
        xs, dot = self.activation(x2, rows, folded.fold_from_rows if folded is not None else 0)
        if folded is not None:
            return self.folded_matmul(folded, x2, xs, dot, lead, rows)
        return self.finish(self.vq_matmul(xs, rows), lead, rows, x2, dot)

    def folded_matmul(self, kernel: Any, x2: nn.Tensor, xs: nn.Tensor, dot: nn.Tensor, lead: list[Any],
                      rows: Any, residual: nn.Tensor | None = None) -> nn.Tensor:
        """The folded kernel on (x2, the prologue's xs and dot): the linear's output, norm bias and bias included
        (and `residual` [rows, out_features] added, for a kernel built with it), in x's leading shape."""
        y_out = nn.Tensor.placeholder([rows, self.out_features], self.dtype)
        scratch = [nn.Tensor.placeholder(list(shape), dt) for shape, dt in kernel.scratch]
        operands = [residual if name == "residual" else getattr(self, name) for name in kernel.operands]
        y = op.tensor_ir_op(kernel.func, "vq_matmul_folded", args=[x2, xs, dot, *operands],
                            out=[*scratch, y_out] if scratch else y_out)
        return op.reshape(y[-1] if scratch else y, [*lead, self.out_features])

    def activation(self, x2: nn.Tensor, rows: Any, below_rows: int = 0) -> tuple[nn.Tensor, nn.Tensor | None]:
        """(xs, dot): `x2[:, perm] * col_scale`, and the fp32 norm-bias dot when the prologue kernel computes it
        (one kernel for both; else None and `finish` computes it). `below_rows` > 0: the prologue runs only below
        that many rows (a folded kernel reads xs / dot there only)."""
        if self.prologue_kernel_used:
            gate = (below_rows,) if below_rows else ()
            xs, dot = op.tensor_ir_op(
                self._select_norm_bias.prologue(self.in_features, self.dtype, self.perm is not None, *gate),
                "vq_prologue",
                args=[x2, *self.prologue_operands()],
                out=[nn.Tensor.placeholder([rows, self.in_features], self.dtype),
                     nn.Tensor.placeholder([rows, 1], "float32")])
            return xs, dot
        return self._permute_and_scale(x2), None

    def vq_matmul(self, xs: nn.Tensor, rows: Any) -> nn.Tensor:
        """The VQ kernel on the prepared activation: `xs @ Wpre.T` as [rows, out_features]."""
        static_rows = rows if isinstance(rows, int) else None
        kernel = self._select_kernel(self.cfg, self.dtype, static_rows)
        y_out = nn.Tensor.placeholder([rows, self.out_features], self.dtype)
        scratch = [nn.Tensor.placeholder(list(shape), dt) for shape, dt in kernel.scratch]
        y = op.tensor_ir_op(
            kernel.func,
            "vq_matmul",
            args=[xs, *(getattr(self, name) for name in kernel.operands)],
            out=[*scratch, y_out] if scratch else y_out,
        )
        return y[-1] if scratch else y

    def finish(self, y: nn.Tensor, lead: list[Any], rows: Any, x2: nn.Tensor, dot: nn.Tensor | None,
               dot_added: bool = False) -> nn.Tensor:
        """`y` plus the norm-bias dot (computed here when `dot` is None, unless the kernel added it: `dot_added`)
        and the bias, in `x`'s leading shape."""
        nb = self._select_norm_bias
        if dot_added:
            pass
        elif self.weight_bias is not None and nb is not None:
            if dot is None:
                dot = op.tensor_ir_op(nb.row_dot(self.in_features, self.dtype), "vq_norm_bias",
                                      args=[x2, self.weight_bias], out=nn.Tensor.placeholder([rows, 1], "float32"))
            y = y + op.astype(dot, self.dtype)
        elif self.weight_bias is not None:
            # a row reduction in fp32, not `x2 @ wb[I, 1]`: dlight's GEMV rule cannot schedule an N=1 matmul on GPUs
            xb = op.astype(x2, "float32") * op.astype(self.weight_bias, "float32")
            y = y + op.astype(op.sum(xb, axis=-1, keepdims=True), self.dtype)
        if self.bias is not None:
            y = y + self.bias
        return op.reshape(y, [*lead, self.out_features])


class GatheredVPTQLinears(nn.Module):
    """`matrices` VPTQ linears of one config stacked (artifact/expert_stack.py), applied per (row, slot) to the matrix
    a slot picks: `y[b, s] = W[mat[b, s]] @ x[b, s or 0]` in one kernel launch for all rows and slots (a mixture of
    experts' selected experts). Permutation, norm scale, norm bias and bias are the matrix's own, as in VPTQLinear."""

    def __init__(self, cfg: VPTQLayerConfig, matrices: int, dtype: str, select_kernel: KernelSelector,
                 codebook_dtype: str | None = None):
        from vptq_mlc.artifact.expert_stack import stacked_operand_shapes

        super().__init__()
        self.cfg, self.matrices, self.dtype = cfg, matrices, dtype
        self._select_kernel = select_kernel
        for name, (shape, dt) in stacked_operand_shapes(cfg, matrices).items():
            float_dtype = codebook_dtype or dtype if name.endswith("centroids") else dtype
            setattr(self, name, nn.Parameter(shape, float_dtype if dt == "float" else dt))
        i_f, o_f = cfg.in_features, cfg.out_features
        self.perm = nn.Parameter((matrices, i_f), "int32") if cfg.enable_perm else None
        self.col_scale = nn.Parameter((matrices, i_f), dtype) if cfg.enable_norm else None
        self.weight_bias = nn.Parameter((matrices, i_f), dtype) if cfg.enable_norm else None
        self.bias = nn.Parameter((matrices, o_f), dtype) if cfg.bias else None

    def forward(self, x: nn.Tensor, mat: nn.Tensor) -> nn.Tensor:
        """x [n, X, I] with X = 1 (every slot reads row b) or X = slots (slot s reads x[b, s]); mat [n, slots] int32
        -> y [n, slots, O]."""
        n, slots = mat.shape
        shared = x.shape[1] == 1
        vectors = [t for t in (self.perm, self.col_scale) if t is not None]

        def prologue(x3: te.Tensor, m: te.Tensor, *vec: te.Tensor) -> te.Tensor:
            """xs[b, s, k] = x[b, s', perm[m, k]] * col_scale[m, k] (the slot's matrix's own)."""
            perm = vec[0] if self.perm is not None else None
            scale = vec[-1] if self.col_scale is not None else None

            def at(b: Any, s: Any, k: Any) -> Any:
                col = perm[m[b, s], k] if perm is not None else k
                val = x3[b, 0 if shared else s, col]
                return val * scale[m[b, s], k] if scale is not None else val

            return te.compute((n, slots, self.cfg.in_features), at, name="gathered_permute")

        xs = op.tensor_expr_op(prologue, "vq_gathered_permute", [x, mat, *vectors])
        kernel = self._select_kernel.gathered(self.cfg, self.dtype, self.matrices, slots)
        y = op.tensor_ir_op(kernel.func, "vq_gathered_matmul",
                            args=[xs, mat, *(getattr(self, name) for name in kernel.operands)],
                            out=nn.Tensor.placeholder([n, slots, self.cfg.out_features], self.dtype))
        if self.weight_bias is None and self.bias is None:
            return y

        dot = None
        if self.weight_bias is not None:  # x . weight_bias[m] in fp32, on the pre-permutation activation
            dot = op.tensor_ir_op(
                self._select_kernel.gathered_row_dot(self.cfg.in_features, self.dtype, slots, shared, self.matrices),
                "vq_gathered_norm_bias", args=[x, mat, self.weight_bias],
                out=nn.Tensor.placeholder([n, slots], "float32"))

        def epilogue(y3: te.Tensor, m: te.Tensor, *extra: te.Tensor) -> te.Tensor:
            """y + dot (in the model dtype, as VPTQLinear) + bias[m]."""
            d = extra[0] if dot is not None else None
            bias = extra[-1] if self.bias is not None else None

            def at(b: Any, s: Any, r: Any) -> Any:
                val = y3[b, s, r] + d[b, s].astype(self.dtype) if d is not None else y3[b, s, r]
                return val + bias[m[b, s], r] if bias is not None else val

            return te.compute((n, slots, self.cfg.out_features), at, name="gathered_bias")

        extra = [t for t in (dot, self.bias) if t is not None]
        return op.tensor_expr_op(epilogue, "vq_gathered_bias", [y, mat, *extra])


def _call_fused(group: Sequence[VPTQLinear], kernel: Any, inputs: Sequence[nn.Tensor], rows: int,
                residual: nn.Tensor | None = None, concat: bool = False) -> list[nn.Tensor]:
    """One call of a fused kernel (`KernelSelector.fused`) for `group` on `inputs` (x; x and the norm weight;
    gate and up): each layer's y with its norm-bias dot (and `residual` added), or one [rows, sum O] with `concat`.
    The kernel's scratch outputs (the two-launch form's xs / dot) come first and are dropped."""
    args = [*inputs, *(t for m in group for t in (*m.prologue_operands(), *(getattr(m, n) for n in kernel.operands)))]
    if residual is not None:
        args.append(residual)
    outs = [nn.Tensor.placeholder([rows, sum(m.out_features for m in group)], group[0].dtype)] if concat else [
        nn.Tensor.placeholder([rows, m.out_features], m.dtype) for m in group]
    scratch = [nn.Tensor.placeholder(list(shape), dt) for shape, dt in kernel.scratch]
    every = [*scratch, *outs]
    ys = op.tensor_ir_op(kernel.func, "vq_matmul_fused", args=args, out=every if len(every) > 1 else every[0])
    return list(ys)[len(scratch):] if len(every) > 1 else [ys]


def _fused_groups(linears: Sequence[nn.Module], rows: int | None,
                  opts: FusedInput = PLAIN_INPUT) -> list[tuple[list[VPTQLinear], Any]]:
    """(layers, kernel): normed VPTQ linears of one config whose prologue and VQ kernel one launch serves
    (`KernelSelector.fused` with `opts`), the largest groups the selector takes (single layers included)."""
    if rows is None:
        return []
    by_key: dict[tuple, list[VPTQLinear]] = {}
    for m in linears:
        if isinstance(m, VPTQLinear) and m.prologue_kernel_used:
            by_key.setdefault((m.cfg, m.dtype, id(m._select_kernel)), []).append(m)
    out = []
    for (cfg, dtype, _), members in by_key.items():
        out += _greedy_chunks(members, 1, lambda chunk, cfg=cfg, dtype=dtype: chunk[0]._select_kernel.fused(
            cfg, dtype, rows, tuple(m.perm is not None for m in chunk), opts))
    return out


def _greedy_chunks(members: list[VPTQLinear], smallest: int, pick: Any) -> list[tuple[list[VPTQLinear], Any]]:
    """(chunk, kernel) in order over `members`: from each position the largest chunk (down to `smallest` members)
    that `pick(chunk)` returns a kernel for; a position no chunk serves is left out."""
    out, i = [], 0
    while len(members) - i >= smallest:
        for count in range(len(members) - i, smallest - 1, -1):
            kernel = pick(members[i : i + count])
            if kernel is not None:
                out.append((members[i : i + count], kernel))
                i += count
                break
        else:
            i += 1
    return out


def _norm_input(norm: nn.Module | None) -> FusedInput | None:
    """The fused kernels' input for linears reading `norm(x)`: x itself (no norm), or an RMSNorm folded into the
    kernel (weight only, over the last axis); None for a norm the kernels do not compute (applied first)."""
    if norm is None:
        return PLAIN_INPUT
    if isinstance(norm, nn.RMSNorm) and norm.bias is None and norm.axes in (-1, [-1]):
        return FusedInput("rmsnorm", float(norm.epsilon))
    return None


def _static_rows(x: nn.Tensor) -> int | None:
    rows = 1
    for d in x.shape[:-1]:
        if not isinstance(d, int):
            return None
        rows *= d
    return rows


def _prologue_groups(linears: Sequence[nn.Module]) -> list[list[VPTQLinear]]:
    """Groups (2..max_shared each) of the linears whose prologues one launch of the shared prologue serves: VPTQ
    linears whose activation side is the prologue kernel, with the same kernels, width and dtype."""
    members = [m for m in linears if isinstance(m, VPTQLinear) and m.prologue_kernel_used]
    if len(members) < 2:
        return []
    nb = members[0]._select_norm_bias
    if nb.shared_prologue is None or nb.max_shared < 2 or any(
            m._select_norm_bias is not nb or (m.in_features, m.dtype) != (members[0].in_features, members[0].dtype)
            for m in members):
        return []
    chunks = [members[i : i + nb.max_shared] for i in range(0, len(members), nb.max_shared)]
    return [c for c in chunks if len(c) >= 2]


def _matmul_groups(linears: Sequence[nn.Module], rows: int | None) -> list[tuple[list[VPTQLinear], Any]]:
    """(layers, kernel): VPTQ linears of one config (and kernel selector) whose VQ kernels one launch serves
    (`KernelSelector.shared`: the CUDA GEMV at decode row counts), the largest groups the selector takes."""
    by_key: dict[tuple, list[VPTQLinear]] = {}
    for m in linears:
        if isinstance(m, VPTQLinear):
            by_key.setdefault((m.cfg, m.dtype, id(m._select_kernel)), []).append(m)
    out = []
    for (cfg, dtype, _), members in by_key.items():
        select = members[0]._select_kernel
        i = 0
        while len(members) - i >= 2:
            for count in range(len(members) - i, 1, -1):
                kernel = select.shared(cfg, dtype, rows, count)
                if kernel is not None:
                    out.append((members[i : i + count], kernel))
                    i += count
                    break
            else:
                break
    return out


def shares_launches(linears: Sequence[nn.Module], x: nn.Tensor) -> bool:
    """Whether `project_shared_input(linears, x)` launches fewer kernels than calling each linear (where nothing is
    shared, e.g. on CPU targets, callers keep their plain calls and so their exact graph)."""
    rows = _static_rows(x)
    fused = _fused_groups(linears, rows)
    done = {id(m) for group, _ in fused for m in group}
    rest = [m for m in linears if id(m) not in done]
    return bool(any(len(g) > 1 for g, _ in fused) or _prologue_groups(rest) or _matmul_groups(rest, rows))


def project_shared_input(linears: Sequence[nn.Module], x: nn.Tensor,
                         norm: nn.Module | None = None) -> list[nn.Tensor]:
    """`[linear(norm(x)) for linear in linears]` (`norm` None: x itself) for linears that read the same activation
    (q/k/v, gate/up), with shared launches where the target has them: one launch for normed VPTQ linears of one
    config whose GEMV prepares the activation itself (and computes an RMSNorm `norm` too); else one prologue launch
    for the VPTQ linears whose activation side is the prologue kernel, one VQ-kernel launch for VPTQ linears of
    one config (the CUDA GEMV at decode row counts), and one folded call for such linears at a symbolic row count
    (`KernelSelector.folded_group`: prefill)."""
    return _project_shared_input(linears, x, norm, concat=False)


def _project_shared_input(linears: Sequence[nn.Module], x: nn.Tensor, norm: nn.Module | None,
                          concat: bool) -> list[nn.Tensor]:
    """`project_shared_input`; with `concat`, a one-element list holding the outputs concatenated (one tensor
    straight from the kernel where one folded group call computes them all in order)."""
    rows = _static_rows(x)
    opts = _norm_input(norm)
    groups = _fused_groups(linears, rows, opts) if opts is not None else []
    outs: dict[int, nn.Tensor] = {}
    if groups:
        lead, rows, x2 = groups[0][0][0]._flatten(x)
        inputs = [x2, norm.weight] if norm is not None else [x2]
        for group, kernel in groups:
            for m, y in zip(group, _call_fused(group, kernel, inputs, rows), strict=True):
                outs[id(m)] = m.finish(y, lead, rows, x2, None, dot_added=True)
    rest = [m for m in linears if id(m) not in outs]
    if rest:
        xn = norm(x) if norm is not None else x
        if concat and len(rest) == len(linears):
            return _project_unfused(rest, xn, concat=True)
        for m, y in zip(rest, _project_unfused(rest, xn), strict=True):
            outs[id(m)] = y
    ys = [outs[id(m)] for m in linears]
    return [op.concat(ys, dim=-1)] if concat else ys


def project_concat(linears: Sequence[nn.Module], x: nn.Tensor, norm: nn.Module | None = None) -> nn.Tensor:
    """`concat([linear(norm(x)) for linear in linears], -1)`: one launch writing every output side by side where
    one fused kernel serves all the linears (q/k/v of one shape, no bias), else `project_shared_input` + concat."""
    rows, opts = _static_rows(x), _norm_input(norm)
    first = linears[0]
    if opts is not None and rows is not None and all(
            isinstance(m, VPTQLinear) and m.bias is None and m.prologue_kernel_used
            and (m.cfg, m.dtype, m._select_kernel) == (first.cfg, first.dtype, first._select_kernel) for m in linears):
        kernel = first._select_kernel.fused(first.cfg, first.dtype, rows, tuple(m.perm is not None for m in linears),
                                            dataclasses.replace(opts, concat=True))
        if kernel is not None:
            lead, rows, x2 = first._flatten(x)
            (y,) = _call_fused(linears, kernel, [x2, norm.weight] if norm is not None else [x2], rows, concat=True)
            return op.reshape(y, [*lead, sum(m.out_features for m in linears)])
    (y,) = _project_shared_input(linears, x, norm, concat=True)
    return y


def linear_residual(linear: nn.Module, x: nn.Tensor, residual: nn.Tensor) -> nn.Tensor:
    """`residual + linear(x)`: one launch where the linear's fused kernel adds the residual in its epilogue."""
    if isinstance(linear, VPTQLinear) and linear.bias is None:
        lead, rows, x2 = linear._flatten(x)
        kernel = linear.fused_kernel(rows, FusedInput(residual=True))
        if kernel is not None:
            res2 = op.reshape(residual, [rows, linear.out_features])
            (y,) = _call_fused([linear], kernel, [x2], rows, residual=res2)
            return op.reshape(y, [*lead, linear.out_features])
        folded = _folded_residual(linear, x2, rows, lead, residual)
        if folded is not None:
            return folded
    return residual + linear(x)


def _folded_residual(linear: VPTQLinear, x2: nn.Tensor, rows: Any, lead: list[Any],
                     residual: nn.Tensor) -> nn.Tensor | None:
    """`residual + linear(x)` as the folded prefill kernel adding the residual in its epilogue (symbolic rows, where
    the target has one), or None."""
    kernel = linear.folded_kernel(rows, residual=True)
    if kernel is None:
        return None
    xs, dot = linear.activation(x2, rows, kernel.fold_from_rows)
    return linear.folded_matmul(kernel, x2, xs, dot, lead, rows,
                                residual=op.reshape(residual, [rows, linear.out_features]))


def swiglu_residual(linear: nn.Module, gate: nn.Tensor, up: nn.Tensor, residual: nn.Tensor | None) -> nn.Tensor:
    """`residual + linear(silu(gate) * up)` (no residual: without the add): one launch where the linear's fused
    kernel computes silu(gate) * up while staging its input (and adds the residual in its epilogue)."""
    if isinstance(linear, VPTQLinear) and linear.bias is None:
        lead, rows, g2 = linear._flatten(gate)
        kernel = linear.fused_kernel(rows, FusedInput("swiglu", residual=residual is not None))
        if kernel is not None:
            u2 = op.reshape(up, [rows, linear.in_features])
            res2 = op.reshape(residual, [rows, linear.out_features]) if residual is not None else None
            (y,) = _call_fused([linear], kernel, [g2, u2], rows, residual=res2)
            return op.reshape(y, [*lead, linear.out_features])
        if residual is not None and linear.folded_kernel(rows, residual=True) is not None:
            _, _, h2 = linear._flatten(op.silu(gate) * up)
            return _folded_residual(linear, h2, rows, lead, residual)
    y = linear(op.silu(gate) * up)
    return residual + y if residual is not None else y


def _folded_groups(linears: Sequence[VPTQLinear], folded: dict[int, Any]) -> list[tuple[list[VPTQLinear], Any]]:
    """(layers, `VQGroupKernel`): consecutive runs of VPTQ linears of one config, each with a folded prefill kernel
    and no bias, that one folded group call serves (`KernelSelector.folded_group`), up to its size."""
    out, run = [], []

    def close() -> None:
        out.extend(_greedy_chunks(list(run), 2, lambda chunk: chunk[0]._select_kernel.folded_group(
            chunk[0].cfg, chunk[0].dtype, tuple(m.perm is not None for m in chunk))))
        run.clear()

    for m in linears:
        ok = folded.get(id(m)) is not None and m.bias is None
        if run and not (ok and (m.cfg, m.dtype, m._select_kernel) == (run[0].cfg, run[0].dtype,
                                                                     run[0]._select_kernel)):
            close()
        if ok:
            run.append(m)
    close()
    return out


def _columns(y: nn.Tensor, start: int, width: int) -> nn.Tensor:
    """y[..., start : start + width] as an injective TE op, so the pass that fuses operators folds it into its
    consumer (silu(gate) * up reads both halves of gate/up's y in one kernel; relax's split would be a copy)."""

    def cols(t: te.Tensor) -> te.Tensor:
        return te.compute((*t.shape[:-1], width), lambda *i: t[(*i[:-1], start + i[-1])], name="columns")

    return op.tensor_expr_op(cols, "columns", [y])


def _call_folded_group(group: Sequence[VPTQLinear], kernel: Any, x2: nn.Tensor, rows: Any,
                       prepared: dict[int, tuple[nn.Tensor, nn.Tensor | None]]) -> nn.Tensor:
    """The folded group call: every layer's output side by side, [rows, sum of out_features]."""
    args = [x2]
    for m, names in zip(group, kernel.operands, strict=True):
        args += [*prepared[id(m)], *(getattr(m, n) for n in names)]
    scratch = [nn.Tensor.placeholder(list(shape), dt) for shape, dt in kernel.scratch]
    width = sum(m.out_features for m in group)
    outs = op.tensor_ir_op(kernel.func, "vq_matmul_folded_group", args=args,
                           out=[*scratch, nn.Tensor.placeholder([rows, width], group[0].dtype)])
    return outs[-1]


def _project_unfused(linears: Sequence[nn.Module], x: nn.Tensor, concat: bool = False) -> list[nn.Tensor]:
    """`[linear(x) for linear in linears]` with the shared prologue / shared VQ launches where the target has them
    (each shared kernel computes every layer's values exactly as that layer's own kernel would). With `concat`: a
    one-element list, the outputs concatenated (a folded group's y itself where one group is every linear)."""
    rows = _static_rows(x)
    fused_groups = _fused_groups(linears, rows)
    done = {id(m) for group, _ in fused_groups for m in group}
    rest = [m for m in linears if id(m) not in done]
    prologue_groups = _prologue_groups(rest)
    matmul_groups = _matmul_groups(rest, rows)
    if not prologue_groups and not matmul_groups and not any(len(g) > 1 for g, _ in fused_groups):
        ys = [m(x) for m in linears]
        return [op.concat(ys, dim=-1)] if concat else ys
    vq = [m for m in linears if isinstance(m, VPTQLinear)]
    lead, rows, x2 = vq[0]._flatten(x)
    fused_out: dict[int, nn.Tensor] = {}
    for group, kernel in fused_groups:
        for m, y in zip(group, _call_fused(group, kernel, [x2], rows), strict=True):
            fused_out[id(m)] = m.finish(y, lead, rows, x2, None, dot_added=True)
    prepared: dict[int, tuple[nn.Tensor, nn.Tensor | None]] = {}
    folded = {id(m): m.folded_kernel(rows) for m in vq}
    for group in prologue_groups:
        first, nb = group[0], group[0]._select_norm_bias
        # the shared prologue skips long prompts where every member's kernel folds it from the same row count
        froms = {folded[id(m)].fold_from_rows if folded[id(m)] is not None else 0 for m in group}
        gate = tuple(froms) if len(froms) == 1 and 0 not in froms else ()
        outs = op.tensor_ir_op(
            nb.shared_prologue(first.in_features, first.dtype, tuple(m.perm is not None for m in group), *gate),
            "vq_prologue_shared",
            args=[x2, *(t for m in group for t in m.prologue_operands())],
            out=[t for _ in group for t in (nn.Tensor.placeholder([rows, first.in_features], first.dtype),
                                            nn.Tensor.placeholder([rows, 1], "float32"))])
        for j, m in enumerate(group):
            prepared[id(m)] = (outs[2 * j], outs[2 * j + 1])
    for m in vq:
        if id(m) not in prepared and id(m) not in done:
            fold = folded[id(m)]
            prepared[id(m)] = m.activation(x2, rows, fold.fold_from_rows if fold is not None else 0)
    ys: dict[int, nn.Tensor] = {}
    grouped: dict[int, nn.Tensor] = {}
    for group, kernel in _folded_groups([m for m in vq if id(m) not in done], folded):
        y = _call_folded_group(group, kernel, x2, rows, prepared)
        y = op.reshape(y, [*lead, y.shape[-1]])
        if concat and [id(m) for m in group] == [id(m) for m in linears]:
            return [y]
        start = 0
        for m in group:
            grouped[id(m)] = _columns(y, start, m.out_features)
            start += m.out_features
    for group, kernel in matmul_groups:
        outs = op.tensor_ir_op(
            kernel.func, "vq_matmul_shared",
            args=[t for m in group for t in (prepared[id(m)][0], *(getattr(m, n) for n in kernel.operands))],
            out=[nn.Tensor.placeholder([rows, m.out_features], m.dtype) for m in group])
        for j, m in enumerate(group):
            ys[id(m)] = outs[j]
    out = []
    for m in linears:
        if not isinstance(m, VPTQLinear):
            out.append(m(x))
            continue
        if id(m) in fused_out:
            out.append(fused_out[id(m)])
            continue
        if id(m) in grouped:
            out.append(grouped[id(m)])
            continue
        xs, dot = prepared[id(m)]
        if folded[id(m)] is not None and id(m) not in ys:
            out.append(m.folded_matmul(folded[id(m)], x2, xs, dot, lead, rows))
            continue
        y = ys[id(m)] if id(m) in ys else m.vq_matmul(xs, rows)
        out.append(m.finish(y, lead, rows, x2, dot))
    return [op.concat(out, dim=-1)] if concat else out
