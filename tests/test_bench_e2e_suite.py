"""`vptq-mlc bench e2e` on CPU with a tiny model and a reduced grid: every system runs in its child process,
the JSON has every metric as a positive number, ratios are consistent with them, and a config-only model dir
gets random weights. No timing assertions (2 shared cores)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from vptq_mlc.artifact.files import CHAT_CONFIG, TENSOR_CACHE
from vptq_mlc.compile.build import compile_model


@pytest.fixture(scope="module")
def dense_system(tiny_served_model: tuple[Path, Path, Path],
                 tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny model's config with every linear dense, config-only (no weights), and its llvm library: the
    counterpart our fp16 build is of the 7B-shape VPTQ library."""
    _, model_dir, _ = tiny_served_model
    root = tmp_path_factory.mktemp("dense")
    cfg_dir = root / "dense-cfg"
    shutil.copytree(model_dir, cfg_dir, ignore=shutil.ignore_patterns(TENSOR_CACHE, "params_shard_*", "*.so"))
    chat = json.loads((cfg_dir / CHAT_CONFIG).read_text())
    chat["vptq"]["layers"] = {}
    chat["quantization"] = "q0f32"
    (cfg_dir / CHAT_CONFIG).write_text(json.dumps(chat))
    (lib,) = compile_model(cfg_dir, "llvm", root / "dense-llvm.so")
    return cfg_dir, lib


def test_bench_e2e_cpu(tiny_served_model: tuple[Path, Path, Path], dense_system: tuple[Path, Path],
                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vptq_mlc.cli import main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the child processes: torch's spinning threads on 2 shared cores

    _, model_dir, lib = tiny_served_model
    dense_dir, dense_lib = dense_system
    out = tmp_path / "e2e.json"
    args = ["bench", "e2e", str(out), "--device", "cpu", "--system", "vq", str(model_dir), str(lib),
            "--system", "fp16", str(dense_dir), str(dense_lib), "--hf-dtype", "float32",
            "--batches", "1,2,64", "--contexts", "24,40", "--prefill", "16,2000", "--steps", "3", "--warmup", "1",
            "--prefill-reps", "1", "--work-dir", str(tmp_path), "--sampling", "0.7,0.9"]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["baseline"] == "fp16" and list(data["systems"]) == ["vq", "fp16", "transformers"]
    assert sorted(q.name for q in tmp_path.glob("e2e*")) == ["e2e.json"]  # partial files merged and removed

    vq, fp16, hf = (data["systems"][n] for n in ("vq", "fp16", "transformers"))
    assert vq["weights"] == "present" and fp16["weights"].startswith("random")
    assert fp16["weight_bytes"] > vq["weight_bytes"] > 0  # dense float32 linears vs 1-byte codes
    for r in (vq, fp16):
        assert r["skipped_batches"] == [64]  # above the library's max_batch_size (32)
        assert r["prefill_chunk_size"] == 64 and r["kv_cache_bytes"] > 0
        assert r["gpu_mem_peak_mib"] is None  # no GPU: reported as unknown, not 0
        assert r["sampling"] == {"mode": "0.7,0.9", "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.0,
                                 "on_device": True}
    assert hf["torch_max_memory_allocated_mib"] is None and hf["transformers"]
    for r in (vq, fp16, hf):
        for ctx in (24, 40):
            for b in (1, 2):
                d = r["decode"][f"b{b}_ctx{ctx}"]
                assert d["tok_s"] > 0 and d["timed_tokens"] == 3 * b and d["prompt_len"] == ctx - 3 - 1 - 1
        assert r["prefill"]["16"]["tokens"] == 16 and r["prefill"]["16"]["tok_s"] > 0
        assert r["prefill"]["2000"]["tokens"] == 1023  # capped at the context window (1024) - 1
        assert "error" not in r and r["wall_s"] > 0
    m = data["metrics"]
    for name in ("vq", "fp16", "transformers"):
        for key in ("decode tok/s, batch 1, ctx 24", "decode tok/s, batch 2, ctx 40", "prefill tok/s, 16 tokens",
                    "prefill tok/s, 2000 tokens (ran 1023: window)", "weights MiB"):
            assert m[name][key] > 0
    ratio = data["ratios"]["vq/fp16"]["decode tok/s, batch 2, ctx 40"]
    assert ratio == pytest.approx(m["vq"]["decode tok/s, batch 2, ctx 40"] / m["fp16"]["decode tok/s, batch 2, ctx 40"])
    assert set(data["ratios"]) == {"vq/fp16", "vq/transformers", "fp16/transformers"}
    assert "| decode tok/s, batch 2, ctx 40 |" in res.output and "vq/transformers" in res.output


def test_gpu_memory_probe_is_device_wide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe asks nvidia-smi for the physical GPU behind the device (CUDA_VISIBLE_DEVICES mapped)."""
    from vptq_mlc.bench.e2e_common import gpu_memory_used_mib, memory_summary

    fake = tmp_path / "nvidia-smi"
    fake.write_text('#!/bin/sh\n[ "$1" = "--query-gpu=memory.used" ] || exit 1\n'
                    'case "$4" in 3) echo 4242;; 0) echo 17;; *) exit 2;; esac\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_memory_used_mib("cuda") == 17 and gpu_memory_used_mib("cpu") is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert gpu_memory_used_mib("cuda:1") == 4242
    assert memory_summary([100, 900, 700]) == {"gpu_mem_before_mib": 100, "gpu_mem_peak_mib": 900,
                                               "gpu_mem_peak_delta_mib": 800}


def test_tiled_random_weights(dense_system: tuple[Path, Path], tmp_path: Path) -> None:
    """--exact-random off: float tensors above the tile size repeat one block, everything else is drawn whole,
    and the engine loads the result."""
    import numpy as np

    from vptq_mlc.bench.e2e_engine import write_weights
    from vptq_mlc.runtime.library import load_library, load_params

    dense_dir, dense_lib = dense_system
    lib = load_library(dense_lib, "cpu")
    shutil.copytree(dense_dir, tmp_path / "m")
    write_weights(tmp_path / "m", lib.metadata["params"], tile=1000)
    index = json.loads((tmp_path / "m" / TENSOR_CACHE).read_text())
    big = [p for p in lib.metadata["params"] if int(np.prod([int(d) for d in p["shape"]])) > 1000]
    assert big and index["metadata"]["tiled_tensors"] == len(big)
    rec = next(r for s in index["records"] for r in s["records"] if r["name"] == big[0]["name"])
    shard = next(s for s in index["records"] if rec in s["records"])
    raw = (tmp_path / "m" / shard["dataPath"]).read_bytes()[rec["byteOffset"]: rec["byteOffset"] + rec["nbytes"]]
    flat = np.frombuffer(raw, dtype=rec["dtype"])
    assert np.array_equal(flat[:1000], flat[1000:2000]) and np.all(np.abs(flat) < 1.0)
    assert load_params(tmp_path / "m", lib) is not None


def test_sampling_option() -> None:
    from vptq_mlc.bench.e2e_common import parse_sampling
    from vptq_mlc.cli import main

    assert parse_sampling("greedy") == "greedy" and parse_sampling("model") == "model"
    assert parse_sampling("0.7,0.9") == (0.7, 0.9)
    res = CliRunner().invoke(main, ["bench", "e2e", "x.json", "--system", "a", ".", __file__, "--sampling", "hot"])
    assert res.exit_code != 0 and "use greedy, model or TEMPERATURE,TOP_P" in res.output


def test_decode_batch_stays_full_when_prompts_prefill_over_many_steps(
        tiny_served_model: tuple[Path, Path, Path]) -> None:
    """Later prompts prefill in small mixed steps that already decode the earlier requests: every request must
    still be running in every timed step (its token budget counts those steps), or tok/s drops mid-window."""
    from vptq_mlc.bench.e2e_common import Grid
    from vptq_mlc.bench.e2e_engine import decode_tok_s
    from vptq_mlc.runtime.engine import Engine

    _, model_dir, lib = tiny_served_model
    engine = Engine(model_dir, str(lib), device="cpu", max_batch_size=4, step_token_budget=8)
    grid = Grid(batches=(4,), contexts=(48,), prefill=(), steps=8, warmup=1, prefill_reps=1, sampling="greedy")
    r = decode_tok_s(engine, 4, 48, grid)  # 4 prompts of 38 tokens: about 20 mixed steps of 8 tokens
    assert r["full_batch_every_step"] and r["timed_tokens"] == 4 * 8


def test_timeline_gaps_finds_the_idle_stretches() -> None:
    """GPU idle time from kernel intervals (overlapping kernels are one busy stretch), by the kernels around it,
    and the host's CUDA API calls, on hand-made profiler events."""
    from types import SimpleNamespace

    import torch

    from vptq_mlc.bench.e2e_engine import timeline_gaps

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def ev(name: str, dev: object, start: float, end: float) -> SimpleNamespace:
        return SimpleNamespace(name=name, device_type=dev, time_range=SimpleNamespace(start=start, end=end))

    events = [ev("gemm", cuda, 0, 10), ev("norm", cuda, 5, 12),  # overlapping: busy 0..12
              ev("attn", cuda, 20, 30), ev("gemm", cuda, 31, 40), ev("attn", cuda, 48, 50),
              ev("cudaStreamSynchronize", cpu, 12, 19), ev("cuLaunchKernel", cpu, 0, 1),
              ev("cuLaunchKernel", cpu, 2, 3), ev("aten::add", cpu, 0, 100)]
    g = timeline_gaps(SimpleNamespace(events=lambda: events))
    assert g["span_us"] == 50 and g["idle_us"] == 8 + 1 + 8
    assert g["gaps"][0] == {"before": "norm", "after": "attn", "us": 8, "count": 1}
    assert {(x["before"], x["after"]): x["us"] for x in g["gaps"]} == {
        ("norm", "attn"): 8, ("gemm", "attn"): 8, ("attn", "gemm"): 1}
    assert g["host_api"] == [{"call": "cudaStreamSynchronize", "us": 7, "count": 1},
                             {"call": "cuLaunchKernel", "us": 2, "count": 2}]
