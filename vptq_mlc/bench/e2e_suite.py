"""`vptq-mlc bench e2e`: end-to-end decode/prefill throughput and peak GPU memory of several systems, side by side
(issue 10 item 5(b)): our VPTQ library, our dense fp16 library of the same shape (same runtime, so the ratio
isolates the kernels) and transformers fp16.

Each system runs in its own child process (`python -m vptq_mlc.bench.e2e_suite SPEC RESULT`): the device-wide
memory figure then starts from a GPU holding nothing of ours, a failing system (e.g. out of memory) does not
take the others down, and our runtime never shares a process with torch. A child rewrites
OUT.<system>.partial.json after every measurement and the parent merges it into OUT after the system, so a run
killed at a time limit keeps what it measured.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from vptq_mlc.atomic import atomic_file
from vptq_mlc.bench.e2e_common import Grid, Recorder, parse_sampling

log = logging.getLogger(__name__)
HF = "transformers"
TORCH = "torch-fp16"  # the gpt-fast-style CUDA-graph decoder (bench/e2e_torch.py)
TILE = 1 << 20  # random float tensors repeat a block of this many values (see write_random_weights)


@dataclass(frozen=True)
class System:
    """One column of the table: ours (`lib` set) or a torch baseline (`lib` None: transformers, or the torch
    CUDA-graph decoder when `name` is TORCH)."""

    name: str
    model_dir: str
    lib: str | None = None
    overlap: bool = True  # ours: the engine's overlapped decoding where the device allows it


def gpu_name(device: str) -> str | None:
    if not device.startswith("cuda"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i",
                          device.partition(":")[2] or "0"], capture_output=True, text=True, check=False)
    return out.stdout.strip() or None


def _run_child(spec: dict[str, Any], tmp: Path, partial: Path) -> dict[str, Any]:
    """One system in a child process; its logs go to our stderr. The child rewrites `partial` after every
    measurement (it survives a run killed at a time limit); once merged into the main JSON it is removed."""
    spec_path = tmp / f"{spec['name']}.spec.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-m", "vptq_mlc.bench.e2e_suite", str(spec_path), str(partial)],
                          check=False)
    if not partial.exists():
        return {"error": f"the child process exited with status {proc.returncode} and wrote no result"}
    res = json.loads(partial.read_text())
    partial.unlink()
    if proc.returncode != 0 and "error" not in res:
        res["error"] = f"the child process exited with status {proc.returncode}"
    return res


def run_suite(systems: list[System], out_json: str | Path, device: str, grid: Grid, baseline: str | None,
              hf_dtype: str | None, work_dir: str | Path | None = None, tile: int = TILE,
              torch_anchor: bool = False) -> dict[str, Any]:
    """Measure every system (then the torch CUDA-graph decoder if `torch_anchor`, then transformers unless
    `hf_dtype` is None) and write `out_json`; returns it."""
    if torch_anchor:
        systems = [*systems, System(TORCH, systems[0].model_dir)]
    if hf_dtype is not None:
        systems = [*systems, System(HF, systems[0].model_dir)]
    results: dict[str, Any] = {"gpu": gpu_name(device), "device": device, "grid": grid.to_json(),
                               "baseline": baseline, "systems": {},
                               "memory_note": "gpu_mem_*: nvidia-smi --query-gpu=memory.used, device-wide "
                                              "(the per-process figure is wrong inside containers); "
                                              "delta = peak - before the system loaded anything"}
    with tempfile.TemporaryDirectory(prefix="vptq-e2e-", dir=work_dir) as tmp:
        for s in systems:
            spec = {"name": s.name, "model_dir": str(s.model_dir), "lib": s.lib, "device": device,
                    "grid": grid.to_json(), "work_dir": str(Path(tmp) / s.name), "tile": tile, "hf_dtype": hf_dtype,
                    "overlap": s.overlap}
            log.info("system %s: %s", s.name, s.lib or f"transformers {hf_dtype}")
            t0 = time.perf_counter()
            partial = Path(out_json).with_name(f"{Path(out_json).stem}.{s.name}.partial.json")
            results["systems"][s.name] = _run_child(spec, Path(tmp), partial)
            results["systems"][s.name]["wall_s"] = round(time.perf_counter() - t0, 1)
            bandwidth = results["systems"].get(TORCH, {}).get("copy_bandwidth_gbs")
            results["metrics"] = {n: flat_metrics(r, grid, bandwidth) for n, r in results["systems"].items()}
            results["ratios"] = ratios(results["metrics"], [s.name for s in systems], baseline)
            with atomic_file(out_json) as f:
                f.write_text(json.dumps(results, indent=1))
    return results


# ---- table ------------------------------------------------------------------------------------------------

MEM_ROW = "peak GPU MiB (device-wide, over before-load)"


ROOFLINE_ROW = "HBM roofline tok/s, batch 1 (weight bytes / copy BW)"


def flat_metrics(r: dict[str, Any], grid: Grid, bandwidth_gbs: float | None = None) -> dict[str, float | None]:
    """One number per table row; None where the system did not measure it. `bandwidth_gbs`: the GPU's measured
    copy bandwidth, for the memory roofline of a batch-1 decode step (every weight byte read once)."""
    m: dict[str, float | None] = {}
    for ctx in grid.contexts:
        for b in grid.batches:
            m[f"decode tok/s, batch {b}, ctx {ctx}"] = r.get("decode", {}).get(f"b{b}_ctx{ctx}", {}).get("tok_s")
    for n in grid.prefill:
        p = r.get("prefill", {}).get(str(n), {})
        ran = p.get("tokens", n)  # capped at the context window - 1
        m[f"prefill tok/s, {n} tokens" + (f" (ran {ran}: window)" if ran != n else "")] = p.get("tok_s")
    m["prefill chunk (tokens)"] = r.get("prefill_chunk_size")
    m[MEM_ROW] = r.get("gpu_mem_peak_delta_mib")
    m["torch max_memory_allocated MiB"] = r.get("torch_max_memory_allocated_mib")
    m["weights MiB"] = r["weight_bytes"] / 2**20 if r.get("weight_bytes") else None
    m[ROOFLINE_ROW] = bandwidth_gbs * 1e9 / r["weight_bytes"] if bandwidth_gbs and r.get("weight_bytes") else None
    m["KV cache MiB (allocated)"] = r["kv_cache_bytes"] / 2**20 if r.get("kv_cache_bytes") else None
    return m


def ratios(metrics: dict[str, dict[str, float | None]], order: list[str], baseline: str | None) -> dict[str, Any]:
    """ours / baseline and ours / transformers for every throughput and memory row."""
    out: dict[str, Any] = {}
    refs = [r for r in (baseline, TORCH, HF) if r and r in metrics]
    for name in order:
        for ref in refs:
            if name in (ref, TORCH, HF) or name not in metrics:
                continue
            out[f"{name}/{ref}"] = {k: (v / metrics[ref][k] if v and metrics[ref].get(k) else None)
                                    for k, v in metrics[name].items() if "tok/s" in k or k == MEM_ROW}
    return out


def markdown_table(results: dict[str, Any]) -> str:
    """Rows = metrics, columns = systems then ratios."""
    metrics, rat = results.get("metrics", {}), results.get("ratios", {})
    cols = list(metrics)
    rows = list(dict.fromkeys(k for m in metrics.values() for k in m))  # every system's rows, in order
    lines = ["| metric | " + " | ".join(cols + list(rat)) + " |", "|---" * (1 + len(cols) + len(rat)) + "|"]
    for key in rows:
        vals = [metrics[c].get(key) for c in cols] + [rat[c].get(key) for c in rat]
        if all(v is None for v in vals):
            continue
        cells = ["" if v is None else f"{v:.1f}" for v in vals[: len(cols)]]
        cells += ["" if v is None else f"{v:.2f}x" for v in vals[len(cols):]]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    errors = [f"{n}: {r['error']}" for n, r in results.get("systems", {}).items() if "error" in r]
    return "\n".join(lines + [f"\nFAILED {e}" for e in errors])


# ---- command -----------------------------------------------------------------------------------------------


def _ints(value: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None
    if not out or min(out) < 1:
        raise click.BadParameter(f"{value!r}: give positive integers, e.g. 1,4,8")
    return out


@click.command(name="e2e")
@click.argument("out_json", type=click.Path(dir_okay=False, path_type=str))
@click.option("--system", "systems", nargs=3, multiple=True, required=True, metavar="NAME MODEL_DIR LIB",
              type=(str, click.Path(file_okay=False, exists=True), click.Path(dir_okay=False, exists=True)),
              help="One of our libraries (repeat). A config-only MODEL_DIR gets random weights in a temp dir.")
@click.option("--no-overlap", "step_by_step", multiple=True, metavar="NAME",
              help="Run this system without overlapped decoding (each step's tokens read before the next step is "
                   "queued); repeat. Give one library twice under two names to compare both ways in one run.")
@click.option("--baseline", default=None, help="Name of our dense fp16 system: ratios ours/baseline "
                                               "(default: a system named fp16, if any).")
@click.option("--transformers/--no-transformers", "with_hf", default=True, show_default=True,
              help="Also run transformers with random weights of the first system's shape.")
@click.option("--hf-dtype", default="float16", show_default=True, help="transformers weight dtype.")
@click.option("--torch-anchor/--no-torch-anchor", default=None,
              help="Also run a gpt-fast-style torch fp16 decoder (static KV cache, CUDA graphs) of the first "
                   "system's shape, and measure the copy bandwidth for the roofline row (default: on for cuda).")
@click.option("--device", default="cuda", show_default=True)
@click.option("--batches", default="1,4,8,16", show_default=True,
              help="Decode batches (ours: those above the library's max_batch_size are skipped).")
@click.option("--contexts", default="128,2048", show_default=True,
              help="Decode contexts: prompt + generated tokens at the last timed step.")
@click.option("--prefill", default="128,512,2048", show_default=True,
              help="Prefill prompt lengths (capped at the context window - 1).")
@click.option("--steps", type=click.IntRange(1), default=32, show_default=True, help="Timed decode steps.")
@click.option("--warmup", type=click.IntRange(1), default=2, show_default=True, help="Untimed decode steps first.")
@click.option("--prefill-reps", type=click.IntRange(1), default=3, show_default=True,
              help="Timed prefills per length (median).")
@click.option("--sampling", default="greedy", show_default=True,
              help="Decode sampling: greedy, model (mlc-chat-config.json's temperature/top_p/penalties) or T,P "
                   "(e.g. 0.7,0.9); seeded per request. The torch CUDA-graph anchor samples with the same "
                   "temperature/top_p on the device; transformers stays greedy.")
@click.option("--work-dir", type=click.Path(file_okay=False, exists=True), default=None,
              help="Where random weights are written (default: the system temp dir); removed afterwards.")
@click.option("--exact-random", is_flag=True, help="Draw every random float (slow for fp16 7B: minutes) instead "
                                                   f"of repeating a random block of {TILE} values per tensor.")
def e2e_cmd(out_json: str, systems: tuple[tuple[str, str, str], ...], step_by_step: tuple[str, ...],
            baseline: str | None, with_hf: bool,
            hf_dtype: str, torch_anchor: bool | None, device: str, batches: str, contexts: str, prefill: str,
            steps: int, warmup: int, prefill_reps: int, sampling: str, work_dir: str | None,
            exact_random: bool) -> None:
    """End-to-end decode/prefill tok/s and peak GPU memory of our libraries next to transformers (one table)."""
    try:
        parse_sampling(sampling)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    grid = Grid(_ints(batches), _ints(contexts), _ints(prefill), steps, warmup, prefill_reps, sampling)
    if min(grid.contexts) <= steps + warmup + 1:
        raise click.BadParameter(f"context {min(grid.contexts)} leaves no prompt for {warmup} + {steps} decode "
                                 "steps; use fewer --steps or longer --contexts")
    names = [s[0] for s in systems]
    if (len(set(names)) != len(names) or {HF, TORCH} & set(names)
            or not all(re.fullmatch(r"[\w.-]+", n) for n in names)):
        raise click.BadParameter(f"system names must be unique words (letters, digits, _ . -), not {HF!r} or "
                                 f"{TORCH!r}: {names}")
    if set(step_by_step) - set(names):
        raise click.BadParameter(f"--no-overlap {sorted(set(step_by_step) - set(names))} is not one of the systems "
                                 f"{names}")
    if baseline is None and "fp16" in names:
        baseline = "fp16"
    if baseline is not None and baseline not in names:
        raise click.BadParameter(f"--baseline {baseline!r} is not one of the systems {names}")
    ours = [System(*s, overlap=s[0] not in step_by_step) for s in systems]
    res = run_suite(ours, out_json, device, grid, baseline, hf_dtype if with_hf else None,
                    work_dir, 0 if exact_random else TILE,
                    device.startswith("cuda") if torch_anchor is None else torch_anchor)
    click.echo(f"device: {res['gpu'] or device}; decode sampling: {sampling}; memory: {res['memory_note']}")
    click.echo(markdown_table(res))
    if any("error" in r for r in res["systems"].values()):
        sys.exit(1)


# ---- child process ----------------------------------------------------------------------------------------


def _child(spec_path: str, result_path: str) -> None:
    """Measure one system from its spec; the result so far (and any error) is in `result_path` at all times."""
    spec = json.loads(Path(spec_path).read_text())
    grid = Grid.from_json(spec["grid"])

    def save(res: dict[str, Any]) -> None:
        with atomic_file(result_path) as f:
            f.write_text(json.dumps(res, indent=1))

    rec = Recorder(spec["device"], {}, save)
    try:
        if spec["lib"] is None and spec["name"] == TORCH:
            from vptq_mlc.bench.e2e_torch import run_torch_system

            run_torch_system(spec["model_dir"], spec["device"], grid, rec)
        elif spec["lib"] is None:
            from vptq_mlc.bench.e2e_hf import run_hf_system

            run_hf_system(spec["model_dir"], spec["device"], spec["hf_dtype"], grid, rec)
        else:
            from vptq_mlc.bench.e2e_engine import run_engine_system

            rec.out["lib"] = os.path.abspath(spec["lib"])
            run_engine_system(spec["model_dir"], spec["lib"], spec["device"], grid, spec["work_dir"], spec["tile"],
                              rec, overlap=spec.get("overlap", True))
    except Exception as e:  # noqa: BLE001 - recorded in the JSON next to what was measured; the others still run
        log.exception("system %s failed", spec["name"])
        rec.out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    save(rec.out)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _child(*sys.argv[1:3])
