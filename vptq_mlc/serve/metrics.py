"""Server counters and gauges, written by the engine loop and the HTTP handlers, read as Prometheus text.

Why our own few lines instead of prometheus_client: the server needs a dozen series and the text format
(https://prometheus.io/docs/instrumenting/exposition_formats/) is simple; one lock keeps updates from two
threads consistent.
"""

from __future__ import annotations

import bisect
import collections
import threading
import time
from dataclasses import dataclass

PREFIX = "vptq_mlc"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RATE_WINDOW_S = 10.0  # tokens/s is the rate over the last RATE_WINDOW_S seconds


@dataclass
class EngineGauges:
    """What the engine loop reports after each iteration."""

    queue_length: int = 0  # requests waiting for admission (not yet given KV pages)
    running: int = 0
    kv_pages_total: int = 0
    kv_pages_free: int = 0


class ServeMetrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.http: collections.Counter[tuple[str, int]] = collections.Counter()
        self.finished: collections.Counter[str] = collections.Counter()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.steps = 0
        self.step_seconds = 0.0
        self.gauges = EngineGauges()
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)
        self._ttft_sum = 0.0
        self._started = time.monotonic()

    # ---- updates ----
    def http_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.http[(endpoint, status)] += 1

    def request_started(self, prompt_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens

    def step(self, seconds: float, new_tokens: int, ttfts: list[float]) -> None:
        now = time.monotonic()
        with self._lock:
            self.steps += 1
            self.step_seconds += seconds
            self.generation_tokens += new_tokens
            if new_tokens:
                self._recent.append((now, new_tokens))
            for t in ttfts:
                self._ttft_counts[bisect.bisect_left(TTFT_BUCKETS, t)] += 1
                self._ttft_sum += t

    def request_finished(self, reason: str) -> None:
        with self._lock:
            self.finished[reason] += 1

    def set_gauges(self, gauges: EngineGauges) -> None:
        with self._lock:
            self.gauges = gauges

    # ---- reads ----
    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            total = sum(n for _, n in self._recent)
            span = min(RATE_WINDOW_S, now - self._started)
        return total / span if span > 0 else 0.0

    def render(self) -> str:
        """The Prometheus text exposition of every series."""
        rate = self.tokens_per_second()
        with self._lock:
            g = self.gauges
            lines: list[str] = []

            def series(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
                lines.append(f"# HELP {PREFIX}_{name} {help_}")
                lines.append(f"# TYPE {PREFIX}_{name} {kind}")
                lines.extend(f"{PREFIX}_{name}{labels} {_num(v)}" for labels, v in samples)

            series("http_requests_total", "counter", "HTTP requests by endpoint and status code.",
                   [(f'{{endpoint="{e}",code="{c}"}}', n) for (e, c), n in sorted(self.http.items())])
            series("requests_finished_total", "counter",
                   "Generation requests that left the engine, by finish reason (stop, length, cancelled, error).",
                   [(f'{{reason="{r}"}}', n) for r, n in sorted(self.finished.items())])
            series("prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", [("", self.prompt_tokens)])
            series("generation_tokens_total", "counter", "Tokens generated.", [("", self.generation_tokens)])
            series("generation_tokens_per_second", "gauge", f"Generated tokens per second over the last "
                   f"{RATE_WINDOW_S:g} s.", [("", rate)])
            series("engine_steps_total", "counter", "Engine steps (one batched prefill or decode each).",
                   [("", self.steps)])
            series("engine_step_seconds_total", "counter", "Seconds spent in engine steps (busy fraction = rate).",
                   [("", self.step_seconds)])
            series("queue_length", "gauge", "Requests waiting for admission (KV pages or a batch slot).",
                   [("", g.queue_length)])
            series("running_requests", "gauge", "Requests holding KV pages (prefilling or decoding).",
                   [("", g.running)])
            series("kv_pages_used", "gauge", "KV cache pages in use.", [("", g.kv_pages_total - g.kv_pages_free)])
            series("kv_pages_free", "gauge", "KV cache pages free.", [("", g.kv_pages_free)])
            series("kv_pages_total", "gauge", "KV cache pages in all.", [("", g.kv_pages_total)])
            name = f"{PREFIX}_time_to_first_token_seconds"
            lines += [f"# HELP {name} Seconds from submission to the first generated token.",
                      f"# TYPE {name} histogram"]
            cum = 0
            for bound, n in zip([*TTFT_BUCKETS, float("inf")], self._ttft_counts):
                cum += n
                le = "+Inf" if bound == float("inf") else _num(bound)
                lines.append(f'{name}_bucket{{le="{le}"}} {cum}')
            lines += [f"{name}_sum {_num(self._ttft_sum)}", f"{name}_count {cum}"]
        return "\n".join(lines) + "\n"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))
