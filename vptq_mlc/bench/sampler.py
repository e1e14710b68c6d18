"""`vptq-mlc bench sampler`: what sampling adds per decode step, the compiled sampler next to the numpy one.

The compiled `sample_tokens` is built alone (as compile/build.py adds it to every model) for the device's target
and timed on logits already on the device, host packing and the token download included; the host sampler
(runtime/sampling.py) is timed on the same logits after the copy to the host, one row at a time, as the engine
did before. Logits profiles: `peaked` (a confident model: a few tokens far above a N(0, 2) bulk, a small
nucleus), `flat` (the N(0, 2) bulk alone: at T 0.6 / top_p 0.9 ~2,100 tokens in the nucleus and ~20,000 candidates
past the compaction bound at a 128256-token vocabulary) and `random_model` (what `bench e2e`'s random weights give:
its tiled lm_head repeats every 256 rows, so 256 N(0, 0.02 * sqrt(4096)) logits each repeat across the vocabulary:
~28,000 tokens in that nucleus and ~65,000 candidates, far from any trained model but what e2e's sampled steps pay;
its logits' spread, not the tiling, makes the nucleus this large: `--exact-random` weights give ~25,000).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

PROFILES = ("peaked", "flat", "random_model")
# bench e2e: a 2**20-value tile over 4096-column lm_head rows; std 0.02 weights on a unit-RMS hidden state
RANDOM_MODEL_PERIOD, RANDOM_MODEL_STD = 256, 0.02 * 64.0


def make_logits(profile: str, batch: int, vocab: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if profile == "random_model":
        period = rng.normal(0.0, RANDOM_MODEL_STD, (batch, RANDOM_MODEL_PERIOD))
        return np.tile(period, (1, -(-vocab // RANDOM_MODEL_PERIOD)))[:, :vocab].astype(np.float32)
    logits = rng.normal(0.0, 2.0, (batch, vocab)).astype(np.float32)
    if profile == "peaked":
        for row in logits:
            top = rng.choice(vocab, 8, replace=False)
            row[top] = 14.0 - 1.5 * np.arange(8) + rng.normal(0, 0.5, 8)
    return logits


def _time(fn: Any, repeats: int) -> float:
    """Median milliseconds of `repeats` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def build_sampler_library(out: str, device: str, arch: str | None = None) -> None:
    """`sample_tokens` alone, compiled for `device`'s kind ("cpu", "cuda", "rocm"; `arch` as `compile --arch`) as
    compile/build.py adds it to every model, written to `out` for `--lib` on a host without the TVM compiler
    (VPTQ_MLC_SAMPLER_TOP_P_SEARCH=1: with the multi-block top-p search, compile/sampler.py)."""
    import tvm
    from tvm import relax

    from vptq_mlc.atomic import atomic_file
    from vptq_mlc.compile.sampler import add_sampler
    from vptq_mlc.compile.targets import resolve_backend

    kind = device.split(":")[0]
    bt = resolve_backend(kind, arch)[0]
    if not bt.has_sampler:
        raise SystemExit(f"no compiled sampler for {kind} yet")
    bt.prepare()
    with bt.target:
        mod = bt.relax_pipeline()(add_sampler(tvm.IRModule(), bt.target))
    with atomic_file(out) as tmp:
        relax.build(mod, bt.target, relax_pipeline=None).export_library(str(tmp))
    log.info("wrote %s (sample_tokens for %s)", out, bt.kind)


def library_sampler(lib: str, device: str) -> tuple[Any, Any, Any]:
    """(device spec, device, `sample_tokens`) of a model library or of one `build_sampler_library` wrote (no
    `_metadata`, no model functions): the relax VM alone, as runtime/library.py starts it."""
    import tvm

    from vptq_mlc.runtime.device import DeviceSpec, resolve_device
    from vptq_mlc.runtime.library import POOLED_ALLOCATOR

    spec, dev = resolve_device(device)  # loads the CUDA plugin when needed, before load_module
    vm = tvm.runtime.load_module(lib)["vm_load_executable"]()
    vm["vm_initialization"](spec.dlpack_type, spec.index, POOLED_ALLOCATOR, DeviceSpec("cpu").dlpack_type, 0,
                            POOLED_ALLOCATOR)
    return spec, dev, vm["sample_tokens"]


def _built_sampler(spec: Any, dev: Any) -> Any:
    """`sample_tokens` compiled alone for the device's target (needs TVM's compiler)."""
    import tvm
    from tvm import relax

    from vptq_mlc.compile.sampler import add_sampler
    from vptq_mlc.compile.targets import resolve_backend

    backend = resolve_backend(spec.kind)[0]
    if not backend.has_sampler:
        raise SystemExit(f"no compiled sampler for {spec.kind} yet")
    target = backend.target
    mod = add_sampler(tvm.IRModule(), target)
    with target:
        mod = backend.relax_pipeline()(mod)
    return relax.VirtualMachine(relax.build(mod, target, relax_pipeline=None), dev)["sample_tokens"]


def bench_sampler(vocab: int, batches: list[int], device: str, temperature: float, top_p: float,
                  repeats: int = 20, host_repeats: int = 5, lib: str | None = None) -> list[dict[str, Any]]:
    """`lib`: time the `sample_tokens` of a compiled model library, or of the sampler alone
    (`build_sampler_library`), instead of building it (a host with a runtime-only TVM)."""
    import tvm

    from vptq_mlc.runtime.device import resolve_device
    from vptq_mlc.runtime.device_sampler import DeviceSampler, SampleRow
    from vptq_mlc.runtime.sampling import Sampler, SamplingParams

    if lib:
        spec, dev, func = library_sampler(lib, device)
    else:
        spec, dev = resolve_device(device)
        func = _built_sampler(spec, dev)
    sampler = DeviceSampler(func, dev)
    sampled = SamplingParams(temperature=temperature, top_p=top_p)
    greedy = SamplingParams(temperature=0.0)
    results = []
    for profile in PROFILES:
        for batch in batches:
            logits = make_logits(profile, batch, vocab)
            on_device = tvm.runtime.tensor(logits, dev)
            # a new uniform per call, as each decode step has: the sampler re-uploads the changed row parameters
            draws = itertools.cycle(np.linspace(0.05, 0.95, 997).tolist())

            def sampled_rows() -> list[SampleRow]:
                return [SampleRow(sampled, next(draws)) for _ in range(batch)]  # noqa: B023 - used in this iteration
            greedy_rows = [SampleRow(greedy) for _ in range(batch)]
            host = [Sampler(SamplingParams(temperature=temperature, top_p=top_p, seed=i)) for i in range(batch)]
            empty = np.empty(0, dtype=np.int64)

            def host_step() -> None:
                for s, row in zip(host, on_device.numpy()):
                    s.sample(row, empty, empty)

            res = {
                "profile": profile, "batch": batch, "vocab": vocab, "device": str(spec),
                "device_sampled_ms": _time(lambda: sampler.sample(on_device, sampled_rows()), repeats),
                "device_greedy_ms": _time(lambda: sampler.sample(on_device, greedy_rows), repeats),
                "host_greedy_ms": _time(lambda: on_device.numpy().argmax(axis=1), repeats),
                "host_sampled_ms": _time(host_step, host_repeats),
                "load_avg_1m": os.getloadavg()[0],
            }
            res["added_ms"] = res["device_sampled_ms"] - res["host_greedy_ms"]
            log.info("%s", res)
            results.append(res)
    return results
