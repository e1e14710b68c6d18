"""The GPU check of the prologue kernels (`bench check`'s prologue cases) passes right kernels and fails wrong ones.

Why: the check runs only on the GPU host, where a harness that compared the wrong tensors would pass silently.
Here the library's kernels are stand-ins written in torch on the CPU (the prologue from its definition in
docs/ARCHITECTURE.md, the VQ kernel as codebook lookups of the generic layout, alone or over several layers in one
call), called through the same DLPack path; wrong stand-ins mix up the linears' dots, skip the permutation or mix
up the layers' outputs. No TVM compile: a few seconds.
"""

from __future__ import annotations

import numpy as np
import pytest
from required import import_required

from vptq_mlc.bench.kernels import KernelCase, _check_prologue_case

torch = import_required("torch", 'pip install -e ".[test]"')


def _torch(t):
    return torch.from_dlpack(t)


class _FakeLibrary:
    """`func(i)`: the VQ kernel of a v8-k256-0 layer (one group, no residual, no outliers) as lookups; `func(i,
    "_prologue")`: the prologue of len(perms) linears, optionally broken."""

    def __init__(self, dtype: str, perms: tuple[bool, ...], fault: str = "", shared: bool = False):
        self.manifest = {"dtype": dtype, "calls": [None], "shared": [0] if shared else []}
        self.perms, self.fault = perms, fault

    def func(self, i: int, suffix: str = ""):
        return {"_prologue": self._prologue, "_shared": self._shared, "": self._vq}[suffix]

    def _shared(self, *args):
        """xs_0, centroids_0, codes_0, xs_1, .., y_0, y_1, ..: every layer's VQ kernel in one call."""
        n = len(self.perms)
        ins, ys = args[: 3 * n], list(args[3 * n:])
        if self.fault == "swapped-outputs":
            ys = ys[1:] + ys[:1]
        for m in range(n):
            self._vq(*ins[3 * m : 3 * m + 3], ys[m])

    def _prologue(self, *args):
        x, rest = _torch(args[0]), [_torch(a) for a in args[1:]]
        ops, outs = rest[: len(rest) - 2 * len(self.perms)], rest[len(rest) - 2 * len(self.perms):]
        dots = []
        for m, has_perm in enumerate(self.perms):
            perm = ops.pop(0) if has_perm else None
            col_scale, weight_bias = ops.pop(0), ops.pop(0)
            gathered = x[:, perm.long()] if perm is not None and self.fault != "no-perm" else x
            outs[2 * m].copy_(gathered * col_scale)
            dots.append((x.double() @ weight_bias.double()).float()[:, None])
        if self.fault == "swapped-dots":
            dots = dots[1:] + dots[:1]
        for m, d in enumerate(dots):
            outs[2 * m + 1].copy_(d)

    @staticmethod
    def _vq(xs, centroids, codes, y):
        xs, centroids, codes, y = _torch(xs), _torch(centroids), _torch(codes), _torch(y)
        n, length = codes.shape
        v = centroids.shape[-1]
        w = centroids[0][codes.long()].permute(0, 2, 1).reshape(n * v, length)  # W[i*v + j, k] = C[codes[i,k], j]
        y.copy_((xs.double() @ w.double().T)[:, : y.shape[1]].to(y.dtype))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("prologue", ["ppp", "pn", "p"])
def test_right_prologue_passes(dtype: str, prologue: str) -> None:
    case = KernelCase("v8-k256-0", 1000, 96, 3, prologue=prologue)
    lib = _FakeLibrary(dtype, tuple(ch == "p" for ch in prologue))
    res = _check_prologue_case(lib, 0, case, np.random.default_rng(0), device="cpu")
    assert [r["case"] for r in res] == [f"{case.name}-m{m}" for m in range(len(prologue))]
    assert all(r["ok"] and r["xs_exact"] for r in res), res


@pytest.mark.parametrize("shared", [False, True])
def test_one_launch_for_all_layers_passes(shared: bool) -> None:
    case = KernelCase("v8-k256-0", 1000, 96, 2, prologue="ppn")
    lib = _FakeLibrary("float16", (True, True, False), shared=shared)
    res = _check_prologue_case(lib, 0, case, np.random.default_rng(1), device="cpu")
    assert all(r["ok"] and r["case"].endswith("-shared") == shared for r in res), res


@pytest.mark.parametrize("fault,shared", [("swapped-dots", False), ("no-perm", False), ("swapped-outputs", True)])
def test_wrong_kernels_fail(fault: str, shared: bool) -> None:
    case = KernelCase("v8-k256-0", 1000, 96, 2, prologue="pp")
    lib = _FakeLibrary("float32", (True, True), fault, shared)
    res = _check_prologue_case(lib, 0, case, np.random.default_rng(0), device="cpu")
    assert not any(r["ok"] for r in res), res


class _FakeFusedLibrary(_FakeLibrary):
    """Adds `func(i, "_fused")`: the fused GEMV of `case.fused_input()` from its definition (RMSNorm or silu * up
    staged in the model dtype, perm + scale, the VQ product + the norm-bias dot, + residual, concat), optionally
    broken."""

    def __init__(self, dtype: str, perms: tuple[bool, ...], case: KernelCase, fault: str = ""):
        super().__init__(dtype, perms)
        self.manifest["fused"] = [0]
        self.opts, self.fault_fused = case.fused_input(), fault

    def func(self, i: int, suffix: str = ""):
        return self._fused if suffix == "_fused" else super().func(i, suffix)

    def _fused(self, *args):
        args = [_torch(a) for a in args]
        o, n = self.opts, len(self.perms)
        x = args.pop(0)
        if o.source == "rmsnorm":
            gamma = args.pop(0)
            xf = x.float()
            if self.fault_fused != "no-norm":
                x = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + o.eps) * gamma.float()).to(x.dtype)
        elif o.source == "swiglu":
            up = args.pop(0)
            x = (x.float() * torch.sigmoid(x.float())).to(x.dtype) * up
        ys = args[len(args) - (1 if o.concat else n):]
        args = args[: len(args) - len(ys)]
        residual = args.pop() if o.residual else None
        outs = []
        for has_perm in self.perms:
            perm = args.pop(0) if has_perm else None
            col_scale, weight_bias, centroids, codes = args.pop(0), args.pop(0), args.pop(0), args.pop(0)
            xs = (x[:, perm.long()] if perm is not None else x) * col_scale
            y = torch.empty(x.shape[0], codes.shape[0] * centroids.shape[-1], dtype=x.dtype)
            self._vq(xs, centroids, codes, y)
            y = (y.double() + x.double() @ weight_bias.double()[:, None]).to(x.dtype)
            outs.append(y[:, : ys[0].shape[1] // (n if o.concat else 1)])
        if residual is not None and self.fault_fused != "no-residual":
            outs = [y + residual for y in outs]
        if o.concat:
            ys[0].copy_(torch.cat(outs, dim=1))
        else:
            for y, out in zip(ys, outs, strict=True):
                y.copy_(out)


@pytest.mark.parametrize("fused,prologue", [("rmsnorm,concat", "ppn"), ("swiglu,residual", "p"), ("residual", "n"),
                                            ("", "pn")])
def test_right_fused_kernel_passes(fused: str, prologue: str) -> None:
    case = KernelCase("v8-k256-0", 1000, 96, 2, prologue=prologue, fused=fused)
    lib = _FakeFusedLibrary("float32", tuple(ch == "p" for ch in prologue), case)
    res = [r for r in _check_prologue_case(lib, 0, case, np.random.default_rng(2), device="cpu")
           if r["case"].endswith("-fused")]
    assert len(res) == len(prologue) and all(r["ok"] for r in res), res


@pytest.mark.parametrize("fused,fault", [("rmsnorm", "no-norm"), ("residual", "no-residual")])
def test_wrong_fused_kernel_fails(fused: str, fault: str) -> None:
    case = KernelCase("v8-k256-0", 1000, 96, 2, prologue="p", fused=fused)
    lib = _FakeFusedLibrary("float32", (True,), case, fault)
    res = [r for r in _check_prologue_case(lib, 0, case, np.random.default_rng(3), device="cpu")
           if r["case"].endswith("-fused")]
    assert res and not any(r["ok"] for r in res), res


class _FakeTwoLaunchLibrary(_FakeFusedLibrary):
    """Adds `func(i, "_two")`: the two-launch form, whose scratch outputs (xs_m [n, I], dot_m [n, 1] per layer)
    come between the inputs and y; "outputs-first": a kernel that takes the scratch for its outputs."""

    def __init__(self, dtype: str, perms: tuple[bool, ...], case: KernelCase, fault: str = ""):
        super().__init__(dtype, perms, case, fault)
        self.manifest["fused"], self.manifest["two_launch"] = [], [0]

    def func(self, i: int, suffix: str = ""):
        return self._two if suffix == "_two" else super().func(i, suffix)

    def _two(self, *args):
        n_y = 1 if self.opts.concat else len(self.perms)
        scratch = args[len(args) - n_y - 2 * len(self.perms): len(args) - n_y]
        assert [tuple(_torch(t).shape)[1] for t in scratch[1::2]] == [1] * len(self.perms)
        rest = args[: len(args) - n_y - 2 * len(self.perms)]
        ys = args[len(args) - n_y:]
        if self.fault_fused == "outputs-first":  # y computed, but stored over the scratch; y keeps its NaN
            tmp = [torch.empty_like(_torch(y)) for y in ys]
            self._fused(*rest, *tmp)
            flat = _torch(scratch[0]).view(-1)
            flat[: tmp[0].numel()].copy_(tmp[0].reshape(-1))
            return
        self._fused(*rest, *ys)


@pytest.mark.parametrize("fused,prologue", [("rmsnorm,concat", "ppn"), ("swiglu,residual", "p"), ("", "pn")])
def test_right_two_launch_kernel_passes(fused: str, prologue: str) -> None:
    case = KernelCase("v8-k256-0", 1000, 96, 2, prologue=prologue, fused=fused)
    lib = _FakeTwoLaunchLibrary("float32", tuple(ch == "p" for ch in prologue), case)
    res = [r for r in _check_prologue_case(lib, 0, case, np.random.default_rng(4), device="cpu")
           if r["case"].endswith("-two-launch")]
    assert len(res) == len(prologue) and all(r["ok"] for r in res), res


@pytest.mark.parametrize("fused,fault", [("rmsnorm", "no-norm"), ("residual", "outputs-first")])
def test_wrong_two_launch_kernel_fails(fused: str, fault: str) -> None:
    case = KernelCase("v8-k256-0", 1000, 96, 2, prologue="p", fused=fused)
    lib = _FakeTwoLaunchLibrary("float32", (True,), case, fault)
    res = [r for r in _check_prologue_case(lib, 0, case, np.random.default_rng(5), device="cpu")
           if r["case"].endswith("-two-launch")]
    assert res and not any(r["ok"] for r in res), res
