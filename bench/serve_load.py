"""Load test for `vptq-mlc serve`: N concurrent streaming clients on the loopback interface.

Each client sends streaming /v1/completions requests one after another until `--requests` have been sent in
all or `--duration` seconds have passed (both bounded). Every stream is checked (SSE framing, JSON, one
finish_reason, `[DONE]`, token count == usage); a stream that fails or is malformed is counted, never retried.
Reports requests/s, output tokens/s, p50/p99 time to first token (TTFT) and inter-token latency (ITL: the gap
between consecutive chunks that carry tokens, divided by the tokens in the later chunk).

    # start the server from a model dir (a subprocess on 127.0.0.1, stopped at the end); several concurrencies:
    python bench/serve_load.py --model MODEL_DIR --device cpu --clients 1,16,64 --requests 128 --max-tokens 32
    # the tiny synthetic model of the CPU tests, built into --synthetic DIR on first use; the same requests through
    # an in-process Engine first (no HTTP); clients spread over 4 load-generator processes:
    python bench/serve_load.py --synthetic /tmp/vptq-serve-tiny --engine-baseline --clients 1,16,64 --procs 4
    # an already running local server:
    python bench/serve_load.py --url http://127.0.0.1:8000 --clients 16
    # a config-only model dir (vptq-mlc bench synth-model --config-only) with --lib is served with random weights
    # 16 streams decode, one 2048-token prompt arrives after 1 s: the streams' ITL before vs during its prefill
    # (run once more with --step-token-budget 0 for the server that pauses decoding during prompts):
    python bench/serve_load.py --model MODEL_DIR --device cuda --clients 16 --max-tokens 512 \
        --long-prompt-tokens 2048 --long-prompt-after 1.0
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

from vptq_mlc.bench.api import MalformedStream, SSEStream, StreamErrorEvent, free_port, stop_server

log = logging.getLogger("serve_load")

MAX_REQUESTS = 100_000
MAX_DURATION_S = 1800.0
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches in "
         "a small town near the river where old stories are told at night").split()


@dataclass
class Result:
    ok: bool
    error: str = ""
    tokens: int = 0
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    latency: float = 0.0
    started: float = 0.0  # time.monotonic(): one clock for every client process on this host
    ended: float = 0.0
    stamps: list[tuple[float, int]] = field(default_factory=list)  # (time.monotonic(), tokens) per token chunk


@dataclass
class Summary:
    clients: int
    requests: int
    lost: int
    malformed: int
    wall_s: float
    requests_per_s: float
    output_tokens: int
    output_tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    engine_steps: int  # server side, from /metrics: steps, mean tokens per step, busy fraction of the wall time
    tokens_per_step: float
    engine_busy_pct: float
    errors: list[str]

    def line(self) -> str:
        return (f"clients {self.clients:3d}: {self.requests} requests in {self.wall_s:.1f} s, "
                f"{self.requests_per_s:.2f} req/s, {self.output_tokens_per_s:.1f} output tok/s, "
                f"TTFT p50 {self.ttft_p50_ms:.1f} ms p99 {self.ttft_p99_ms:.1f} ms, "
                f"ITL p50 {self.itl_p50_ms:.2f} ms p99 {self.itl_p99_ms:.2f} ms, "
                f"lost {self.lost}, malformed {self.malformed}; server: {self.engine_steps} steps, "
                f"{self.tokens_per_step:.1f} tok/step, engine busy {self.engine_busy_pct:.0f}%")


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no samples."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


def server_counters(url: str) -> dict[str, float]:
    """The counters of /metrics this report uses (vptq_mlc_engine_steps_total, ...)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("vptq_mlc_engine_steps_total", "vptq_mlc_engine_step_seconds_total",
                    "vptq_mlc_generation_tokens_total"):
            out[name] = float(value)
    return out


def prompt_for(i: int) -> str:
    n = 4 + i % 13
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(n))


async def one_request(client: httpx.AsyncClient, model: str | None, i: int, max_tokens: int,
                      sampling: str = "greedy", prompt: str | list[int] | None = None,
                      on_first_token: Callable[[], None] | None = None) -> Result:
    """One streaming completion; `sampling` "greedy" sends temperature 0, "model" leaves temperature and top_p
    out so that the server samples with the model's defaults."""
    body = {"prompt": prompt_for(i) if prompt is None else prompt, "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
    if sampling == "greedy":
        body["temperature"] = 0
    if model:
        body["model"] = model
    t0 = time.perf_counter()
    res = Result(ok=False, started=time.monotonic())
    last: float | None = None
    finishes, usage = 0, None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            stream = SSEStream(r)
            async for chunk in stream:
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk["choices"]:
                    now = time.perf_counter()
                    n = len(choice.get("token_ids", []))
                    if n:
                        if res.ttft is None:
                            res.ttft = now - t0
                            if on_first_token is not None:
                                on_first_token()
                        elif last is not None:
                            res.itls.append((now - last) / n)
                        last = now
                        res.tokens += n
                        res.stamps.append((time.monotonic(), n))
                    finishes += choice.get("finish_reason") is not None
    except MalformedStream as e:
        res.error = f"malformed: {e}"
        return res
    except StreamErrorEvent as e:
        res.error = str(e)
        return res
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.latency = time.perf_counter() - t0
    if not stream.done or finishes != 1 or usage is None or usage.get("completion_tokens") != res.tokens:
        res.error = f"malformed: done={stream.done} finish_reasons={finishes} usage={usage} tokens={res.tokens}"
        return res
    res.ok = True
    return res


async def one_request_timed(client: httpx.AsyncClient, model: str | None, i: int, max_tokens: int,
                            sampling: str = "greedy", prompt: str | list[int] | None = None,
                            on_first_token: Callable[[], None] | None = None) -> Result:
    res = await one_request(client, model, i, max_tokens, sampling, prompt, on_first_token)
    res.ended = time.monotonic()
    return res


async def client_part(url: str, model: str | None, clients: int, indices: list[int], duration: float,
                      max_tokens: int, sampling: str = "greedy") -> list[Result]:
    """`clients` concurrent streaming clients in this process, sharing the request indices until done or timed out."""
    counter = iter(indices)
    deadline = time.perf_counter() + duration
    results: list[Result] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        for i in counter:
            if time.perf_counter() > deadline:
                return
            results.append(await one_request_timed(client, model, i, max_tokens, sampling))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(max(60.0, duration))) as client:
        await asyncio.wait_for(asyncio.gather(*[client_loop(client) for _ in range(clients)]), duration + 120)
    return results


def _client_process(job: tuple) -> list[Result]:
    return asyncio.run(client_part(*job))


def run_level(url: str, model: str | None, clients: int, procs: int, requests: int, duration: float,
              max_tokens: int, sampling: str = "greedy") -> Summary:
    """One concurrency level; with procs > 1 the clients are split over that many processes, so that the load
    generator (JSON + HTTP parsing per chunk) is not what limits a fast server."""
    procs = max(1, min(procs, clients))
    jobs = [(url, model, clients // procs + (p < clients % procs), list(range(p, requests, procs)), duration,
             max_tokens, sampling) for p in range(procs)]
    before = server_counters(url)
    t0 = time.perf_counter()
    if procs == 1:
        results = _client_process(jobs[0])
    else:
        with multiprocessing.get_context("spawn").Pool(procs) as pool:
            results = [r for part in pool.map(_client_process, jobs) for r in part]
    # from the first request sent to the last one finished (client process start-up is not load)
    wall = max(r.ended for r in results) - min(r.started for r in results) if results else time.perf_counter() - t0
    after = server_counters(url)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    steps = int(delta.get("vptq_mlc_engine_steps_total", 0))
    good = [r for r in results if r.ok]
    lost = [r for r in results if not r.ok and not r.error.startswith("malformed")]
    malformed = [r for r in results if r.error.startswith("malformed")]
    tokens = sum(r.tokens for r in good)
    ttfts = [r.ttft for r in good if r.ttft is not None]
    itls = [x for r in good for x in r.itls]
    return Summary(
        clients=clients, requests=len(results), lost=len(lost), malformed=len(malformed), wall_s=wall,
        requests_per_s=len(good) / wall, output_tokens=tokens, output_tokens_per_s=tokens / wall,
        ttft_p50_ms=1e3 * percentile(ttfts, 50), ttft_p99_ms=1e3 * percentile(ttfts, 99),
        itl_p50_ms=1e3 * percentile(itls, 50), itl_p99_ms=1e3 * percentile(itls, 99),
        engine_steps=steps, tokens_per_step=delta.get("vptq_mlc_generation_tokens_total", 0.0) / max(steps, 1),
        engine_busy_pct=100 * delta.get("vptq_mlc_engine_step_seconds_total", 0.0) / wall,
        errors=sorted({r.error for r in results if not r.ok})[:10],
    )


def long_prompt_ids(n: int) -> list[int]:
    """A prompt of exactly `n` token ids (ids 5..204, valid in any vocabulary of the models we serve)."""
    return [5 + (7 * i + 3) % 200 for i in range(n)]


async def long_prompt_scenario(url: str, model: str | None, streams: int, max_tokens: int, long_tokens: int,
                               after: float, sampling: str) -> dict:
    """`streams` streaming requests start together; `after` seconds after all of them have their first token,
    one `long_tokens`-token prompt is sent. The streams' gaps between token chunks are split into those that ended
    before it was sent and those that overlap its prefill (sent .. its first token): a server that pauses decoding
    for a prompt shows the whole prefill as one gap per stream in the second group. Gaps are not divided by the
    chunk's tokens (unlike `run_level`'s ITL), so that a client that lags and gets merged chunks cannot spread a
    stall over them; `merged_chunk_pct` says how often that happened."""
    limits = httpx.Limits(max_connections=streams + 1, max_keepalive_connections=streams + 1)
    first_tokens, started = asyncio.Event(), [0]

    def on_first_token() -> None:
        started[0] += 1
        if started[0] == streams:
            first_tokens.set()

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(600.0)) as client:
        tasks = [asyncio.create_task(one_request_timed(client, model, i, max_tokens, sampling, None, on_first_token))
                 for i in range(streams)]
        waiter = asyncio.ensure_future(first_tokens.wait())
        await asyncio.wait([waiter, *tasks], timeout=600,
                           return_when=asyncio.FIRST_COMPLETED)  # every stream has a token (or one ended early)
        waiter.cancel()
        await asyncio.sleep(after)
        sent = time.monotonic()
        long = await one_request_timed(client, model, -1, 4, sampling, long_prompt_ids(long_tokens))
        results = await asyncio.gather(*tasks)
    if not long.ok or not long.stamps:
        raise SystemExit(f"error: the long prompt failed ({long.error}); lower --long-prompt-tokens below the "
                         "context window")
    first = long.stamps[0][0]
    before, during, every = [], [], []
    for r in results:  # whole gaps between chunks: a stall stays one gap even where the server merged tokens
        for (t0, _), (t1, _) in zip(r.stamps, r.stamps[1:]):
            every.append(t1 - t0)
            if t1 <= sent:
                before.append(t1 - t0)
            elif t0 < first:
                during.append(t1 - t0)
    chunks = [n for r in results for _, n in r.stamps]
    running = sum(1 for r in results if r.stamps and r.stamps[-1][0] >= first)
    ms = [1e3 * x for x in during]
    return {
        "streams": streams, "long_prompt_tokens": long_tokens, "sampling": sampling,
        "streams_failed": sum(not r.ok for r in results), "streams_running_at_first_token": running,
        "long_prefill_ms": 1e3 * (first - sent),
        "itl_before_p50_ms": 1e3 * percentile(before, 50), "itl_before_p99_ms": 1e3 * percentile(before, 99),
        "itl_during_p50_ms": 1e3 * percentile(during, 50), "itl_during_p99_ms": 1e3 * percentile(during, 99),
        "itl_during_max_ms": max(ms, default=float("nan")), "gaps_before": len(before), "gaps_during": len(during),
        "itl_all_p50_ms": 1e3 * percentile(every, 50), "itl_all_p99_ms": 1e3 * percentile(every, 99),
        "merged_chunk_pct": 100 * sum(n > 1 for n in chunks) / max(len(chunks), 1),
    }


def long_prompt_line(r: dict) -> str:
    return (f"{r['streams']} streams, {r['long_prompt_tokens']}-token prompt ({r['sampling']} sampling): prefill "
            f"{r['long_prefill_ms']:.0f} ms; stream ITL before p50 {r['itl_before_p50_ms']:.2f} ms p99 "
            f"{r['itl_before_p99_ms']:.2f} ms ({r['gaps_before']} gaps), during p50 {r['itl_during_p50_ms']:.2f} ms "
            f"p99 {r['itl_during_p99_ms']:.2f} ms max {r['itl_during_max_ms']:.2f} ms ({r['gaps_during']} gaps), "
            f"whole streams p50 {r['itl_all_p50_ms']:.2f} ms p99 {r['itl_all_p99_ms']:.2f} ms; "
            f"{r['streams_running_at_first_token']}/{r['streams']} streams still running at its first token, "
            f"{r['streams_failed']} failed, {r['merged_chunk_pct']:.0f}% of chunks carried several tokens (the "
            "client lagged)")


def engine_baseline(args: argparse.Namespace, model_dir: Path, levels: list[int]) -> list[dict]:
    """The same work without HTTP: `--requests` requests (same prompts and sampling, EOS ignored) in rounds of B
    submitted together and stepped by one in-process Engine until done, for each level B; output tok/s =
    generated tokens / wall time (prefill included)."""
    import gc

    from vptq_mlc.runtime import Engine

    engine = Engine(model_dir, args.lib, device=args.device, max_batch_size=args.max_batch_size,
                    max_total_tokens=args.max_total_tokens)
    # the server's rule for fields a request leaves out: the model's defaults (temperature, top_p, penalties)
    params = engine.frontend.sampling_params(max_tokens=args.max_tokens, ignore_eos=True,
                                             temperature=0.0 if args.sampling == "greedy" else None)

    def rounds(b: int, n: int) -> tuple[int, int, float]:
        tokens = steps = 0
        t0 = time.perf_counter()
        for start in range(0, n, b):
            reqs = [engine.add_request(prompt_for(i), params) for i in range(start, min(n, start + b))]
            while engine.has_unfinished():
                engine.step()
                steps += 1
            tokens += sum(len(r.output_ids) for r in reqs)
        return tokens, steps, time.perf_counter() - t0

    out = []
    try:
        rounds(1, args.warmup)
        for b in levels:
            tokens, steps, wall = rounds(b, args.requests)
            out.append({"batch": b, "requests": args.requests, "tokens": tokens, "wall_s": wall, "steps": steps,
                        "output_tokens_per_s": tokens / wall})
            print(f"engine only, batch {b:3d}: {args.requests} requests, {tokens} tokens in {wall:.2f} s, "
                  f"{tokens / wall:.1f} output tok/s ({steps} steps, {tokens / steps:.1f} tok/step)", flush=True)
    finally:
        engine = None  # free its memory (device memory on a GPU) before the server loads its own  # noqa: F841
        gc.collect()
    return out


# ---- server under test --------------------------------------------------------------------------------------


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise SystemExit(f"error: {url} is not a loopback address; this load test only targets 127.0.0.1/localhost")


def build_synthetic(out: Path, max_batch: int) -> Path:
    """The tiny synthetic llama of the CPU tests (context 1024), converted and compiled for llvm once."""
    from vptq_mlc.compile.build import compile_model
    from vptq_mlc.convert.converter import convert_checkpoint
    from vptq_mlc.testing.synthetic import make_synthetic_checkpoint

    model_dir = out / "tiny"
    if not list(model_dir.glob("*-llvm.so")):
        ckpt = make_synthetic_checkpoint(out / "ckpt", arch="llama", variant="v8-k256-0", dtype="float32", seed=11,
                                         overwrite=True)
        convert_checkpoint(ckpt, model_dir, context_window_size=1024, prefill_chunk_size=64,
                           max_batch_size=max_batch, overwrite=True)
        compile_model(model_dir, "llvm")
    return model_dir


def start_server(args: argparse.Namespace, model_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-c", "from vptq_mlc.cli import main; main()", "serve", str(model_dir),
           "--device", args.device, "--host", "127.0.0.1", "--port", str(port), "--max-queue", str(args.max_queue)]
    for flag, value in (("--lib", args.lib), ("--max-batch-size", args.max_batch_size),
                        ("--max-total-tokens", args.max_total_tokens), ("--step-token-budget", args.step_token_budget)):
        if value is not None:
            cmd += [flag, str(value)]
    log.info("starting %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=sys.stderr)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"error: the server exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("error: the server was not ready after 300 s")
        time.sleep(0.25)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a running server on the loopback interface")
    src.add_argument("--model", type=Path, help="MLC model dir: start `vptq-mlc serve` on 127.0.0.1 for the run")
    src.add_argument("--synthetic", type=Path, help="build (once) and serve the tiny synthetic CPU model here")
    ap.add_argument("--lib", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-batch-size", type=int, default=None)
    ap.add_argument("--max-total-tokens", type=int, default=None)
    ap.add_argument("--max-queue", type=int, default=1024)
    ap.add_argument("--clients", default="64", help="comma-separated concurrencies, run one after another")
    ap.add_argument("--requests", type=int, default=256, help="requests per concurrency level")
    ap.add_argument("--duration", type=float, default=120.0, help="seconds per concurrency level, at most")
    ap.add_argument("--max-tokens", type=int, default=32, help="output tokens per request (EOS ignored)")
    ap.add_argument("--procs", type=int, default=1,
                    help="client processes per level (clients split over them; 1 = one asyncio process)")
    ap.add_argument("--warmup", type=int, default=4, help="requests before measuring (not counted)")
    ap.add_argument("--json", type=Path, default=None, help="also write the summaries here")
    ap.add_argument("--engine-baseline", action="store_true",
                    help="first run the same requests through an in-process Engine (no HTTP), batch = each level")
    ap.add_argument("--sampling", choices=("greedy", "model"), default="greedy",
                    help="greedy: temperature 0; model: no temperature/top_p, the server uses the model's defaults")
    ap.add_argument("--step-token-budget", type=int, default=None,
                    help="passed to the started server (0: prompts pause decoding; default: the server's)")
    ap.add_argument("--long-prompt-tokens", type=int, default=None,
                    help="scenario: each level's clients stream --max-tokens tokens, then one prompt of this many "
                         "tokens arrives; reports the streams' ITL before vs during its prefill (the server's "
                         "max batch size must exceed the clients, or the prompt waits for a stream to end)")
    ap.add_argument("--long-prompt-after", type=float, default=1.0,
                    help="seconds after every stream has its first token")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if not 1 <= args.requests <= MAX_REQUESTS or not 0 < args.duration <= MAX_DURATION_S:
        raise SystemExit(f"error: --requests must be in 1..{MAX_REQUESTS} and --duration in (0, {MAX_DURATION_S:g}]")
    levels = [int(c) for c in args.clients.split(",")]

    proc, baseline, scratch = None, [], None
    if args.url:
        check_loopback(args.url)
        url = args.url.rstrip("/")
    else:
        model_dir = args.model or build_synthetic(args.synthetic, max(64, max(levels)))
        if args.lib and not (model_dir / "tensor-cache.json").exists():  # config-only: random weights, as bench e2e
            from vptq_mlc.bench.api import TILE
            from vptq_mlc.bench.e2e_engine import prepare_weights
            from vptq_mlc.errors import VPTQMLCError
            from vptq_mlc.runtime.library import load_library

            scratch = tempfile.TemporaryDirectory(prefix="vptq-serve-load-")
            try:
                params = load_library(args.lib, args.device).metadata["params"]
                model_dir, _ = prepare_weights(model_dir, params, Path(scratch.name) / "model", TILE)
            except (VPTQMLCError, OSError) as e:  # a bad library, device or model dir: one line, as the CLI does
                scratch.cleanup()
                raise SystemExit(f"error: {e}") from None
        if args.synthetic and args.max_batch_size is None:  # the long prompt needs a slot of its own
            args.max_batch_size = min(64, max(levels) + bool(args.long_prompt_tokens))
        if args.synthetic and args.max_total_tokens is None:
            args.max_total_tokens = 16384
        if args.engine_baseline:
            baseline = engine_baseline(args, model_dir, levels)
        proc, url = start_server(args, model_dir)
    try:
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        if args.warmup:
            run_level(url, model, 1, 1, args.warmup, 60, args.max_tokens, args.sampling)
        summaries, scenarios = [], []
        for n in levels if args.long_prompt_tokens else []:
            r = asyncio.run(long_prompt_scenario(url, model, n, args.max_tokens, args.long_prompt_tokens,
                                                 args.long_prompt_after, args.sampling))
            scenarios.append(r)
            print(long_prompt_line(r), flush=True)
        for n in [] if args.long_prompt_tokens else levels:
            s = run_level(url, model, n, args.procs, args.requests, args.duration, args.max_tokens, args.sampling)
            summaries.append(s)
            print(s.line(), flush=True)
            for e in s.errors:
                print(f"  error: {e}", flush=True)
    finally:
        if proc is not None:
            stop_server(proc, 30)
        if scratch is not None:
            scratch.cleanup()
    if args.json:
        meta = {"url": url, "model": model, "max_tokens": args.max_tokens, "cpu_count": os.cpu_count(),
                "load_average": os.getloadavg(), "procs": args.procs, "sampling": args.sampling,
                "argv": sys.argv[1:]}
        args.json.write_text(json.dumps({"meta": meta, "engine_only": baseline, "long_prompt": scenarios,
                                         "results": [asdict(s) for s in summaries]}, indent=2) + "\n")
    return 1 if any(s.lost or s.malformed for s in summaries) else 0


if __name__ == "__main__":
    sys.exit(main())
