"""Servers for the serve tests: an in-process one over the tiny served model, and waiting for a `vptq-mlc serve`
subprocess."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from vptq_mlc.runtime import Engine
from vptq_mlc.serve.server import ServerThread


@contextlib.contextmanager
def tiny_server(tiny_served_model: tuple[Path, Path, Path], max_batch_size: int, max_total_tokens: int | None = None,
                **server_options: Any) -> Iterator[ServerThread]:
    """A `ServerThread` (options as given) over a CPU Engine of the tiny served model (tests/conftest.py)."""
    _, model_dir, lib = tiny_served_model
    engine = Engine(model_dir, lib, device="cpu", max_batch_size=max_batch_size, max_total_tokens=max_total_tokens)
    with ServerThread(engine, **server_options) as server:
        yield server


def wait_until_healthy(proc: subprocess.Popen, url: str, timeout: float = 90.0) -> None:
    """Poll `url`/health until it answers 200; fail with the server's output if it exits, or after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else f"server exited with {proc.returncode}"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not come up"
        time.sleep(0.2)
