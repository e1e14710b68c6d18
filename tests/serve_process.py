"""Waiting for a `vptq-mlc serve` subprocess, shared by the tests that start one."""

from __future__ import annotations

import subprocess
import time

import httpx


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
