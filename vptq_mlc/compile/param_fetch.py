"""Fetch each weight from the parameter tuple just before its first use, not all of them at a function's entry.

A model function takes its weights as one tuple and unpacks it at its start: one `TupleGetItem` binding per tensor,
which the relax VM runs as one `vm.builtin.tuple_getitem` call each (about 0.1 us on a server CPU). A 7B decode
function has about 1,200 of them, so the host spends 100+ us before it launches the first kernel, and at batch 1
the GPU waits for it: after the engine synchronises the device before a decode call, every step starts with that
idle stretch. Fetched at their first use instead, only the first layer's weights are read before the first
launch; the rest are read between launches the GPU is already busy with.

The export also unpacks every weight in every function, so `embed` fetches all of them to read one table: a
fetch nobody reads is dropped. So is `KillAfterLastUse`'s release of each fetched weight after its last use (one
more VM instruction per weight and call, freeing nothing: the tuple holds the tensor).

The pass only moves (or drops) bindings of the form `v = TupleGetItem(p, i)` with `p` a parameter of the function,
within a function whose body is straight-line binding blocks (every function the model export makes after VM
lowering). Reading a field of a tuple whose length the entry has checked has no effect and cannot fail, so the
order changes nothing but when the host does the work. It runs on the lowered module (after `VMShapeLower`, which
inserts its own checks at the entry and leaves these bindings alone), so nothing after it reorders them again.
"""

from __future__ import annotations

import tvm
from tvm import relax

_KILL_OBJECT = tvm.ir.Op.get("relax.vm.kill_object")


def _param_fetch(binding: relax.Binding, params: set[relax.Var]) -> bool:
    value = binding.value
    return (isinstance(binding, relax.VarBinding) and isinstance(value, relax.TupleGetItem)
            and isinstance(value.tuple_value, relax.Var) and value.tuple_value in params)


def _kills(binding: relax.Binding, fetches: dict[relax.Var, relax.Binding]) -> bool:
    """`KillAfterLastUse`'s release of a fetched weight: the tuple still holds the tensor, so it frees nothing and
    only costs the VM an instruction."""
    value = binding.value
    return (isinstance(value, relax.Call) and value.op.same_as(_KILL_OBJECT) and len(value.args) == 1
            and isinstance(value.args[0], relax.Var) and value.args[0] in fetches)


def fetch_at_first_use(func: relax.Function) -> relax.Function | None:
    """`func` with its parameter-tuple fetches moved to just before their first use, and the unread fetches and
    the releases of the read ones dropped; None when nothing changes (no fetches, or a body that is not plain
    binding blocks: an `If`, a dataflow block)."""
    body = func.body
    if not isinstance(body, relax.SeqExpr) or any(isinstance(b, relax.DataflowBlock) for b in body.blocks):
        return None
    bindings = [b for block in body.blocks for b in block.bindings]
    if any(isinstance(b.value, (relax.If, relax.SeqExpr, relax.Function)) for b in bindings):
        return None
    params = set(func.params)
    fetches = {b.var: b for b in bindings if _param_fetch(b, params)}
    if not fetches:
        return None
    ordered: list[relax.Binding] = []
    placed: set[relax.Var] = set()

    def fetch_first(used: list[relax.Var]) -> None:
        for v in used:
            if v in fetches and v not in placed:
                ordered.append(fetches[v])
                placed.add(v)

    for b in bindings:
        if b.var in fetches or _kills(b, fetches):
            continue
        fetch_first(relax.analysis.free_vars(b.value))
        ordered.append(b)
    fetch_first(relax.analysis.free_vars(body.body))  # fetched only to be returned
    # a fetch nobody reads is never placed: dropped (the export unpacks every weight in every function)
    if [b.var for b in ordered] == [b.var for b in bindings]:
        return None
    new_body = relax.SeqExpr([relax.BindingBlock(ordered)], body.body)
    return relax.Function(func.params, new_body, func.ret_ty, func.is_pure, func.attrs, func.span)


def fetch_params_at_first_use() -> tvm.transform.Pass:
    """The module pass: every relax function's parameter-tuple fetches moved to their first use."""

    @tvm.transform.module_pass(opt_level=0, name="VPTQFetchParamsAtFirstUse")
    def transform(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        funcs = {}
        changed = False
        for gv, func in mod.functions_items():
            moved = fetch_at_first_use(func) if isinstance(func, relax.Function) else None
            funcs[gv] = func if moved is None else moved
            changed |= moved is not None
        return tvm.IRModule(funcs, attrs=mod.attrs) if changed else mod

    return transform
