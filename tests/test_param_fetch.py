"""compile/param_fetch.py: each weight is fetched from the parameter tuple just before its first use. Checked on
the VM's instruction order (the executable's text) and against numpy, on a hand-written three-layer function and
on the tiny model library's `decode`."""

from __future__ import annotations

import re

import numpy as np
import tvm
from tvm import relax
from tvm.script import relax as R

from vptq_mlc.compile.targets import resolve_backend

LAYERS = 3


def _three_layers() -> tvm.IRModule:
    """`x -> relu(x @ w_i + b_i)` three times, the weights in one tuple unpacked at the entry as the model export
    does, plus one fetched weight only returned and one never read."""

    @tvm.script.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor((1, 8), "float32"),
                 params: R.Tuple(R.Tensor((8, 8), "float32"), R.Tensor((8,), "float32"),
                                 R.Tensor((8, 8), "float32"), R.Tensor((8,), "float32"),
                                 R.Tensor((8, 8), "float32"), R.Tensor((8,), "float32"),
                                 R.Tensor((8,), "float32"), R.Tensor((8,), "float32"))):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                w0 = params[0]
                b0 = params[1]
                w1 = params[2]
                b1 = params[3]
                w2 = params[4]
                b2 = params[5]
                extra = params[6]
                unused = params[7]  # noqa: F841 - unpacked and never read, as the export does
                h0 = R.nn.relu(R.add(R.matmul(x, w0), b0))
                h1 = R.nn.relu(R.add(R.matmul(h0, w1), b1))
                h2 = R.nn.relu(R.add(R.matmul(h1, w2), b2))
                out = (h2, extra)
                R.output(out)
            return out

    return Module


def _instructions(executable: relax.VMExecutable, func: str) -> list[str]:
    text = executable.as_text()
    start = text.index(f"@{func}:")
    end = text.find("\n@", start + 1)
    return [line.strip() for line in text[start:end if end > 0 else None].splitlines()[1:] if line.strip()]


def _fetched(lines: list[str], params: str) -> list[int]:
    """The tuple fields the instructions fetch from register `params` (the weight tuple), in order."""
    return [int(m.group(1)) for line in lines
            if (m := re.match(rf"call\s+vm\.builtin\.tuple_getitem\s+in: %{params}, i(\d+)", line))]


def _destinations(lines: list[str], call: str) -> set[str]:
    """The registers the instructions matching `call` (a regex of the callee and its arguments) write."""
    return {m.group(1) for line in lines if (m := re.match(rf"call\s+{call}\s+dst: (%\d+)", line))}


def _fetches_before_first_kernel(lines: list[str]) -> int:
    """How many `tuple_getitem` calls the function makes before its first call of a compiled kernel."""
    n = 0
    for line in lines:
        callee = re.match(r"call\s+(\S+)", line)
        if callee is None:
            continue
        if callee.group(1) == "vm.builtin.tuple_getitem":
            n += 1
        elif not callee.group(1).startswith("vm.builtin."):
            return n
    raise AssertionError("no kernel call in the function")


def test_three_layers_fetch_each_weight_at_its_layer() -> None:
    (bt,) = resolve_backend("llvm")
    bt.prepare()
    with bt.target:
        lowered = bt.relax_pipeline()(_three_layers())
    executable = relax.build(lowered, bt.target, relax_pipeline=None)
    lines = _instructions(executable, "main")
    fetched = _fetched(lines, "1")
    assert sorted(fetched) == list(range(2 * LAYERS + 1))  # every field read fetched once, the unread one dropped
    assert fetched == sorted(fetched)  # in the order the layers use them, the returned one last
    assert _fetches_before_first_kernel(lines) <= 2  # the first layer's weight and bias only
    registers = _destinations(lines, r"vm\.builtin\.tuple_getitem\s+in: %1, i\d+")
    released = _destinations(lines, r"vm\.builtin\.null_value\s+in:")
    assert len(registers) == 2 * LAYERS + 1 and not registers & released  # the tuple holds the weights: no releases

    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 8)).astype(np.float32)
    weights = [rng.normal(size=s).astype(np.float32) for _ in range(LAYERS) for s in ((8, 8), (8,))]
    extra = rng.normal(size=8).astype(np.float32)
    dev = tvm.cpu()
    vm = relax.VirtualMachine(executable, dev)
    h, got_extra = vm["main"](tvm.runtime.tensor(x, dev),
                              [tvm.runtime.tensor(a, dev) for a in [*weights, extra, extra]])
    want = x
    for i in range(LAYERS):
        want = np.maximum(want @ weights[2 * i] + weights[2 * i + 1], 0)
    np.testing.assert_allclose(h.numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got_extra.numpy(), extra)


def test_tiny_model_decode_fetches_one_layer_before_its_first_kernel(tiny_served_model) -> None:
    """The tiny llvm library's decode (its tokens are checked against transformers by the e2e tests) fetches
    fewer weights before its first kernel than one decoder layer holds, each weight at most once and not the
    embedding table; `embed` fetches that table only."""
    _, _, lib = tiny_served_model
    executable = relax.VMExecutable(tvm.runtime.load_module(str(lib)))
    lines = _instructions(executable, "decode")
    decode = _fetched(lines, "2")
    assert len(set(decode)) == len(decode) > 20 and 0 not in decode
    per_layer = len(decode) // 2  # the tiny model has two decoder layers
    assert _fetches_before_first_kernel(lines) < per_layer, lines[:40]
    assert _fetched(_instructions(executable, "embed"), "1") == [0]
