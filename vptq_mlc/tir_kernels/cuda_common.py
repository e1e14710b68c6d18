"""Pieces shared by the hand-scheduled GPU kernels (gather GEMV, tensor-core MMA, code-sorted, prologue).

`@T.macro` bodies are pasted into the calling kernel when TVMScript parses it (as in TVM's
relax/frontend/nn/llm/_kernel_common.py), so a kernel built from them is the same TIR as one written out by hand:
the generated CUDA is byte for byte what the inline code gave (bench/kernel_sources.py checks every kernel
variant). Macros here are hygienic: everything they touch comes in as an argument, and names they bind (loop
variables) keep the spelling the kernels used, because serial loop variables appear in the CUDA source.

Index arithmetic is passed as whole expressions (`base`), never bound to a name first: a Python-level binding
inside a kernel becomes a one-element local array in the CUDA source, which loses the alignment 16-byte vector
loads need.
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.script import tirx as T

# Every hand-scheduled kernel: no aliasing between buffers, dlight leaves it alone (`tirx.is_scheduled`), and Relax
# FuseOps never fuses it with a neighbour (op_pattern 8 = kOpaque: a fused copy would lose the schedule).
KERNEL_ATTRS = {"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}


def replace_prim_funcs(mod: tvm.IRModule, replacements: dict) -> tvm.IRModule:
    """`mod` with each PrimFunc in `replacements` ({global var: (new PrimFunc, new name)}) added under its new name,
    every Relax reference to the old global var (calls and function values alike, e.g. the kernels a paged KV cache
    is created with) pointed at the new one, and the old function dropped."""
    from tvm import relax

    @relax.expr_functor.mutator
    class _Redirect(relax.PyExprMutator):
        def __init__(self, module, mapping):
            super().__init__(module)
            self.mapping = mapping

        def visit_global_var_(self, op):
            return self.mapping.get(op, op)

    redirect = _Redirect(mod, {})
    for gv, (func, name) in replacements.items():  # the builder gives the new global vars their signature
        redirect.mapping[gv] = redirect.builder_.add_func(func, name)
    for gv, f in mod.functions.items():
        if isinstance(f, relax.Function):
            redirect.builder_.update_func(gv, redirect.visit_expr(f))
    built = redirect.builder_.get()
    return tvm.IRModule({gv: f for gv, f in built.functions.items() if gv not in replacements}, attrs=built.attrs)


def vr(base, n: int):
    """`n` consecutive elements from `base`: a vector access, or a scalar one when n == 1."""
    return base if n == 1 else T.Ramp(base, 1, n)


def pow2_floor(x: int) -> int:
    """The largest power of two <= max(1, x) (launch-shape heuristics)."""
    return 1 << (max(1, x).bit_length() - 1)


def keep_params(func: tirx.PrimFunc, keep) -> tirx.PrimFunc:
    """`func` without the parameters not named in `keep`: kernels declare every operand buffer any variant reads
    (one TVMScript body serves them all) and drop the unused ones so the signature matches the operand list."""
    params = [prm for prm in func.params if prm.name in keep]
    return tirx.PrimFunc(params, func.body, func.ret_type, func.attrs)


def ordered_params(func: tirx.PrimFunc, names: list[str]) -> tirx.PrimFunc:
    """`func` with exactly the parameters `names`, in that order (a variant whose callers pass its operands in
    another order than the TVMScript declares them)."""
    by_name = {prm.name: prm for prm in func.params}
    return tirx.PrimFunc([by_name[n] for n in names], func.body, func.ret_type, func.attrs)


@T.macro
def fill_book_replicated(cb_s, base, stage, book, entries, per_group, iters, threads, tid, v, ev, rep):
    """Copy `book[G, per_group, v]` (`entries` = G * per_group) into shared memory at `base`, entry t's copy q at
    `base + (t * rep + q) * v`; every load goes through `stage` (registers) first, `iters` unrolled rounds so the
    loads overlap. Thread t stores copy (q + t) % rep at step q: a quarter-warp's stores hit 8 bank groups."""
    for it in T.unroll(iters):
        t = it * threads + tid
        if t < entries:
            for j0 in T.unroll(v // ev):
                stage[vr(j0 * ev, ev)] = book[t // per_group, t % per_group, vr(j0 * ev, ev)]
            for q in T.unroll(rep):
                for j0 in T.unroll(v // ev):
                    cb_s[vr(base + (t * rep + (q + t) % rep) * v + j0 * ev, ev)] = stage[vr(j0 * ev, ev)]


@T.macro
def fill_book_direct(cb_s, base, book, entries, per_group, threads, tid, v, whole_entry):
    """Copy `book[G, per_group, v]` into shared memory at `base` (entry-major, serial rounds over the CTA's
    threads): one `v`-wide access per entry when `whole_entry`, else `v` scalar ones."""
    for it in range(-(-entries // threads)):
        t = it * threads + tid
        if t < entries:
            if whole_entry:
                cb_s[vr(base + t * v, v)] = book[t // per_group, t % per_group, vr(0, v)]
            else:
                for j in T.unroll(v):
                    cb_s[base + t * v + j] = book[t // per_group, t % per_group, j]


@T.macro
def load_entry(dst, src, start, v, ev):
    """`dst[0:v] = src[start : start + v]` in `ev`-wide accesses (a codebook entry from a flat, shared book)."""
    for j0 in T.unroll(v // ev):
        dst[vr(j0 * ev, ev)] = src[vr(start + j0 * ev, ev)]


@T.macro
def load_book_entry(dst, book, grp, code, v, ev):
    """`dst[0:v] = book[grp, code, 0:v]` in `ev`-wide accesses (a codebook entry read through L1/L2)."""
    for j0 in T.unroll(v // ev):
        dst[vr(j0 * ev, ev)] = book[grp, code, vr(j0 * ev, ev)]


@T.macro
def fma_entry(acc, b, v, x, w):
    """`acc[b*v : b*v + v] += x * w[0:v]` in fp32 (one activation times one codebook entry)."""
    for j in T.unroll(v):
        acc[b * v + j] = acc[b * v + j] + x * T.Cast("float32", w[j])


@T.macro
def warp_sum(acc, n, lanes, width):
    """Sum `acc[0:n]` over each group of `lanes` consecutive lanes into its first lane (shuffle-down halving;
    `width` is the shuffle segment, the hardware warp). Every lane of the warp must take part."""
    mask = T.tvm_warp_activemask()
    for a in T.unroll(n):
        for s in T.unroll(lanes.bit_length() - 1):
            acc[a] = acc[a] + T.tvm_warp_shuffle_down(mask, acc[a], (lanes // 2) >> s, width, width)


def grouped_tile(tb, grid_n, group_m: int, group_rows):
    """(column tile, row tile) of CTA `tb` under grouped rasterization (`DensePlan.group_m`, `WgmmaPlan.group_m`):
    tiles come in groups of `group_m` row tiles (`group_rows` = min(row tiles left from this group's first,
    group_m), fewer in the last group), column by column inside a group. Plain arithmetic: works on ints (tests)
    and TIR expressions."""
    first_row = tb // (group_m * grid_n) * group_m
    inside = tb % (group_m * grid_n)
    return inside // group_rows, first_row + inside % group_rows
