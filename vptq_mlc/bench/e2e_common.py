"""What the `vptq-mlc bench e2e` orchestrator and its per-system workers share: the grid, the prompts, and the
device-wide GPU memory probe. Imports nothing heavy (no tvm, no torch)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Grid:
    """Decode at every (batch, context); prefill at every prompt length."""

    batches: tuple[int, ...] = (1, 4, 8, 16)
    contexts: tuple[int, ...] = (128, 2048)
    prefill: tuple[int, ...] = (128, 512, 2048)
    steps: int = 32  # timed decode steps per (batch, context)
    warmup: int = 2  # untimed decode steps before them
    prefill_reps: int = 3  # timed prefills per length (median)
    sampling: str = "greedy"  # decode sampling: "greedy", "model" (mlc-chat-config.json's defaults) or "T,P"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Grid:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def parse_sampling(value: str) -> tuple[float, float] | str:
    """`--sampling`: "greedy", "model", or "T,P" (temperature, top_p) -> the name or the pair; ValueError if bad."""
    if value in ("greedy", "model"):
        return value
    try:
        t, p = (float(v) for v in value.split(","))
    except ValueError:
        raise ValueError(f"--sampling {value!r}: use greedy, model or TEMPERATURE,TOP_P (e.g. 0.7,0.9)") from None
    if t < 0 or not 0 < p <= 1:
        raise ValueError(f"--sampling {value!r}: temperature must be >= 0 and top_p in (0, 1]")
    return t, p


def decode_prompt_len(context: int, grid: Grid) -> int:
    """Prompt length such that prompt + generated tokens = `context`: the timed steps attend over the last
    `steps` positions below `context`, and a 2048 context still fits a 2048-token window (the engine caps a
    request at window - prompt new tokens)."""
    n = context - grid.steps - grid.warmup - 1
    if n < 1:
        raise ValueError(f"context {context} is too short for {grid.warmup} + {grid.steps} decode steps; "
                         "use a longer context or fewer --steps")
    return n


def prompt_ids(i: int, n: int, vocab: int) -> list[int]:
    """A deterministic prompt of `n` ids, different per request `i` (EOS is ignored, so any ids will do)."""
    span = max(1, min(1000, vocab - 1))
    return [1 + (i * 7 + j) % span for j in range(n)]


def gpu_memory_used_mib(device: str) -> int | None:
    """Device-wide used memory of the GPU behind `device` (nvidia-smi --query-gpu), MiB; None off CUDA.

    Device-wide on purpose: inside the container nvidia-smi's per-process figure missed our process."""
    if not device.startswith(("cuda", "gpu")) or shutil.which("nvidia-smi") is None:
        return None
    index = device.partition(":")[2] or "0"
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if visible and int(index) < len(visible):
        index = visible[int(index)]  # nvidia-smi counts physical GPUs (or takes a UUID)
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", index],
                         capture_output=True, text=True, check=False)
    try:
        return int(out.stdout.strip().splitlines()[0])
    except (IndexError, ValueError):
        return None


def memory_summary(samples: list[int | None]) -> dict[str, Any]:
    """Before = the first sample (taken before anything was loaded); peak = the largest sample."""
    got = [s for s in samples if s is not None]
    if samples[0] is None or not got:
        return {"gpu_mem_before_mib": None, "gpu_mem_peak_mib": None, "gpu_mem_peak_delta_mib": None}
    return {"gpu_mem_before_mib": samples[0], "gpu_mem_peak_mib": max(got),
            "gpu_mem_peak_delta_mib": max(got) - samples[0]}


class Recorder:
    """A system's result dict `out`, filled as it goes: `point()` after every measurement samples device memory
    (outside timed regions: TVM's pooled allocator and torch's caching allocator keep what they took, so the
    largest sample is the peak) and saves `out`, so a run killed at the device call's time limit keeps what it
    measured. The first sample is taken here, before the system loads anything."""

    def __init__(self, device: str, out: dict[str, Any], save: Callable[[dict[str, Any]], None]) -> None:
        self.device, self.out, self.save = device, out, save
        self.samples = [gpu_memory_used_mib(device)]
        self.out.update(memory_summary(self.samples))

    def point(self) -> None:
        self.samples.append(gpu_memory_used_mib(self.device))
        self.out.update(memory_summary(self.samples))
        self.save(self.out)
