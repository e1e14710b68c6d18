"""Kernel launches of one compiled function (default `decode`) on CUDA, per decoder layer: what a decode step
replays, counted on the build box (no GPU, no nvcc: the relax pipeline only, CUDA graphs off so every launch is a
call in the function's body).

    python3 -m vptq_mlc.bench.launches MODEL_DIR [--function decode] [--list]

MODEL_DIR may be config-only (`vptq-mlc bench synth-model DIR --config-only --layers 3`). A call is one PrimFunc;
a PrimFunc launches one kernel per outermost thread binding (the code-sorted kernel: 2; a PrimFunc that picks a path
at run time, as the symbolic-row prefill kernel, counts the kernels of every path). Each decoder layer makes
one KV-cache attention call (a packed call: the cache's own append/attention kernels are not counted here), so a
layer's launches are those from one attention call to the next; `--list` prints every call in order.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path


def kernels_in(func) -> int:
    """Outermost thread bindings of a PrimFunc (`launch_thread` or a `thread_binding` loop): one per device kernel
    it launches."""
    from tvm import tirx

    count = 0

    def binds_thread(stmt) -> bool:
        if isinstance(stmt, tirx.AttrStmt) and stmt.attr_key == "thread_extent":
            return True
        return isinstance(stmt, tirx.For) and stmt.thread_binding is not None

    def visit(stmt) -> None:
        nonlocal count
        if binds_thread(stmt):
            count += 1
            return
        for attr in ("seq", "body", "then_case", "else_case", "block", "init"):
            child = getattr(stmt, attr, None)
            if child is None:
                continue
            for c in (child if attr == "seq" else [child]):
                if isinstance(c, tirx.Stmt):
                    visit(c)

    visit(func.body)
    return count


def lowered_module(model_dir: Path, arch: str = "sm_90", static_decode_batches: tuple[int, ...] = ()):
    """The model's relax module after the CUDA pipeline (what `compile` builds), with CUDA graphs off;
    `static_decode_batches` adds `batch_decode_b<n>` functions (the CUDA build has 2..8, 12 and 16)."""
    import tvm

    from vptq_mlc.artifact.chat_config import ChatConfig
    from vptq_mlc.checkpoint.arch import model_config_from_json
    from vptq_mlc.compile.targets import resolve_backend
    from vptq_mlc.model.builder import build_model

    chat = ChatConfig.load(model_dir)
    arch_name = chat.model_type or "llama"
    cfg = model_config_from_json(arch_name, chat.model_config)
    (bt,) = resolve_backend("cuda", arch)
    bt.prepare()
    model = build_model(cfg, chat.vptq_layers(), chat.model_dtype, bt.target, bt.kernel_selector(chat.layouts),
                        static_decode_batches, bt.norm_bias_kernels(), arch=arch_name, logits_dtype=bt.logits_dtype,
                        embedding_dtype=chat.embedding_dtype, codebook_dtype=chat.codebook_dtype)
    spec = model.get_default_spec()
    mod, _ = model.export_tvm(spec=spec)
    with bt.target, tvm.transform.PassContext(config={}):
        return bt.relax_pipeline()(mod), cfg.num_hidden_layers


def launches(mod, function: str) -> list[tuple[str, int]]:
    """(callee, kernels it launches) for every call of `function`'s body in order; packed calls count 0 (the KV
    cache's builtins: their attention/append kernels are launched by the runtime, counted as `packed:<name>`)."""
    import tvm
    from tvm import relax, tirx

    gvars = {gv.name_hint: gv for gv in mod.functions}
    out: list[tuple[str, int]] = []

    def visit_expr(e) -> None:
        if isinstance(e, relax.Call):
            op = e.op
            if isinstance(op, relax.GlobalVar) and isinstance(mod[op], tirx.PrimFunc):
                out.append((op.name_hint, kernels_in(mod[op])))
            elif isinstance(op, relax.ExternFunc):
                out.append((f"packed:{op.global_symbol}", 0))
            elif isinstance(op, tvm.ir.Op) and op.name in ("relax.call_packed", "relax.call_builtin_with_ctx"):
                name = e.args[0].global_symbol if isinstance(e.args[0], relax.ExternFunc) else str(e.args[0])
                out.append((f"packed:{name}", 0))
            for a in e.args:
                visit_expr(a)
        elif isinstance(e, relax.SeqExpr):
            for block in e.blocks:
                for b in block.bindings:
                    visit_expr(b.value)
            visit_expr(e.body)
        elif isinstance(e, relax.If):
            visit_expr(e.true_branch)
            visit_expr(e.false_branch)
        elif isinstance(e, relax.Tuple):
            for f in e.fields:
                visit_expr(f)

    visit_expr(mod[gvars[function]].body)
    return out


def launches_per_layer(calls: list[tuple[str, int]]) -> list[int]:
    """Launches from each decoder layer's KV-cache attention call to the next one (one attention call per layer)."""
    attn = [i for i, (n, _) in enumerate(calls) if "attention" in n]
    return [sum(k for _, k in calls[attn[i]:attn[i + 1]]) for i in range(len(attn) - 1)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--function", default="decode")
    ap.add_argument("--list", action="store_true", help="print every call in order")
    a = ap.parse_args()
    mod, layers = lowered_module(a.model_dir)
    calls = launches(mod, a.function)
    kernel_calls = [(n, k) for n, k in calls if k]
    if a.list:
        for n, k in calls:
            print(f"{k}  {n}")
    total = sum(k for _, k in kernel_calls)
    print(f"{a.function}: {len(kernel_calls)} PrimFunc calls, {total} kernel launches, "
          f"{sum(1 for n, _ in calls if n.startswith('packed:'))} packed calls, {layers} layers")
    per = launches_per_layer(calls)
    if per:
        print(f"launches per decoder layer (attention to attention): {per}")
        attn = next(i for i, (n, _) in enumerate(calls) if "attention" in n)
        nxt = next(i for i, (n, _) in enumerate(calls) if "attention" in n and i > attn)
        names = Counter(n.rstrip("0123456789_") for n, k in calls[attn:nxt] if k)
        print("  by kernel family:", dict(sorted(names.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
