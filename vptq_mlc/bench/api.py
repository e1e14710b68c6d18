"""`vptq-mlc bench api`: what the OpenAI server's features cost, measured through HTTP on one model library.

Three questions, one run (random weights fill a config-only model dir, as `bench e2e` does):
  * structured output: batch-1 decode tok/s of a `response_format` json_schema chat request next to a free-form
    request of the same prompt and the same number of tokens (greedy, then the model's default sampling);
  * prefix caching: time to first token of a request whose long prefix (1,024 tokens by default) is new, of a second
    request with the same prefix and another suffix, and of a control with a new prefix of the same length, with
    the prefix-cache counters of /metrics read around each;
  * the server's overhead: decode tok/s of the same requests (token-id prompts, EOS ignored) through the in-process
    `Engine` and through the server's streams, at each batch size (all requests sent together), greedy and (unless
    --no-default-sampling) with the model's default sampling (its temperature, top_p and penalties; seeded, so the
    server's tokens can be compared with the engine's: the counter-based generator does not depend on the batch).

Why per-token time from stamps: a decode rate is (tokens after the first) / (last token's time - first token's time)
for each stream, from the streamed chunks' arrival times (the engine side: the step that produced each token), so
prefill, time to first token and an early EOS cannot move it; free-form requests ignore EOS, and the structured
request's schema (an array of exactly `--items` one-digit integers) fixes its length whatever the weights are.
Aggregate tok/s at batch B is the sum of the B streams' rates.

The server runs as `vptq-mlc serve` in a subprocess on 127.0.0.1 (a free port), as bench/serve_load.py starts it, so
the client's JSON parsing does not share the server's interpreter; the in-process engine is measured first and
freed before the server loads. Both get the same engine settings (batch, KV tokens, prefix cache on).

Build box (apache-tvm with the compiler; ART is carried to the GPU host):
    bash bench/gpu_artifacts.sh ART tvm_rt e2e7b     # ART/e2e7b/v8-k4096-0-cfg/ + v8-k4096-0-cuda.so, ...
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d ART/wheels fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 h11==0.16.0 click==8.5.1 \\
        httpx==0.29.0 httpcore==1.0.9 anyio==4.16.0 idna==3.21 certifi==2026.10.19.post1 pydantic==2.14.4 \\
        pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 \\
        annotated-doc==0.0.7 opentelemetry-api==1.45.3 xgrammar==0.2.8
  (xgrammar's declared torch/transformers/triton are not needed: serve/structured.py loads only its native binding,
  which needs tvm_ffi, part of the runtime bundle; numpy, tokenizers and jinja2 are the runtime's own.)
GPU host (no package index; Python 3.12, torch, numpy, tokenizers):
    bash bench/gpu_suite.sh OUT ART api7b    # installs ART/wheels (or $WHEELS) into /tmp/sp, then runs
    PYTHONPATH=$PYTHONPATH:/tmp/sp vptq-mlc -v bench api ART/e2e7b/v8-k4096-0-cfg \\
        --lib ART/e2e7b/v8-k4096-0-cuda.so --device cuda --json OUT/api_7b.json
CPU, the tiny model of the tests: tests/test_bench_api.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import logging
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

from vptq_mlc.atomic import atomic_file

log = logging.getLogger(__name__)

TILE = 1 << 20  # as `bench e2e`: random float tensors repeat a block of this many values
SUFFIX_TOKENS = 16  # the part of a prefix-cache request after the shared prefix
PREFIX_METRICS = ("prefix_cache_lookups_total", "prefix_cache_hits_total", "prefix_cache_hit_tokens_total")
STRUCTURED_PROMPT = "Write a JSON array of one-digit integers."
SERVER_START_S = 900.0  # loading a 7B model dir (weights to the GPU) included


@dataclasses.dataclass
class Settings:
    """What one run measures (the CLI's options)."""

    batches: tuple[int, ...] = (1, 16)
    prompt_tokens: int = 32  # engine-vs-server requests
    decode_tokens: int = 128
    prefix_tokens: int = 1024
    items: int = 200  # the structured array's length (minItems = maxItems)
    reps: int = 3
    max_total_tokens: int | None = None
    default_sampling: bool = True  # also measure structured vs free and server vs engine with the model's sampling


@dataclasses.dataclass
class Timed:
    """One request's token arrivals: (seconds since it was sent, tokens) per chunk or step that carried tokens."""

    stamps: list[tuple[float, int]] = dataclasses.field(default_factory=list)
    token_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    usage_tokens: int | None = None

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.stamps)

    @property
    def ttft(self) -> float:
        return self.stamps[0][0]

    def decode_tok_s(self) -> float:
        """Tokens after the first chunk over the time from the first chunk to the last (see the module doc)."""
        if len(self.stamps) < 2:
            raise RuntimeError(f"a stream delivered {self.tokens} tokens in {len(self.stamps)} chunks; a decode "
                               "rate needs at least two (the server merges tokens a lagging client has not read: "
                               "ask for more tokens)")
        return (self.tokens - self.stamps[0][1]) / (self.stamps[-1][0] - self.stamps[0][0])


def random_prompt(seed: int, n: int, vocab: int) -> list[int]:
    """`n` token ids drawn from ids 1..min(1000, vocab - 1) (valid in any model we serve); distinct seeds give
    prompts that share no prefix (the prefix cache must not see a hit the test did not plan)."""
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(1, max(2, min(1000, vocab - 1)) + 1, n)]


def structured_schema(items: int) -> dict[str, Any]:
    """An array of exactly `items` integers 0..9: its length does not depend on what the weights prefer."""
    return {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
            "minItems": items, "maxItems": items}


def follows_schema(text: str, items: int) -> bool:
    """`text` is what `structured_schema(items)` allows (checked by hand: the GPU host has no jsonschema)."""
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, list) and len(value) == items and \
        all(type(v) is int and 0 <= v <= 9 for v in value)


def summed_rate(streams: list[Timed]) -> float:
    return sum(s.decode_tok_s() for s in streams)


# ---- the in-process engine ------------------------------------------------------------------------------------


def warmup_prompt_tokens(s: Settings, prefill_chunk: int) -> int:
    """A warm-up prompt that runs a whole prefill chunk where the KV cache sized by `_kv_tokens` holds one."""
    return min(prefill_chunk, s.prefix_tokens)


def sampling_modes(s: Settings) -> list[str]:
    """The server-vs-engine sampling modes a run measures: greedy, and the model's default sampling if asked."""
    return ["greedy"] + (["model_sampling"] if s.default_sampling else [])


def batches_key(mode: str) -> str:
    """Where a mode's per-batch results go: "batches" (greedy, as before) or "batches_model_sampling"."""
    return "batches" if mode == "greedy" else f"batches_{mode}"


def engine_round(engine: Any, prompts: list[list[int]], max_tokens: int, mode: str = "greedy") -> list[Timed]:
    """`prompts` added together (EOS ignored) and stepped to the end; a token's stamp is the end of the step that
    produced it. The parameters are the server's for `completion_body` in `mode`: the model's defaults filled in by
    the same rule (so the sampler takes the same path), the i-th prompt seeded with i when sampling."""
    sampling = {"temperature": 0.0} if mode == "greedy" else {}
    t0 = time.perf_counter()
    reqs = [engine.add_request(p, engine.frontend.sampling_params(max_tokens=max_tokens, ignore_eos=True,
                                                                  **sampling, **_seed(mode, i)))
            for i, p in enumerate(prompts)]
    out = {id(r): Timed() for r in reqs}
    while engine.has_unfinished():
        stepped = engine.step()
        now = time.perf_counter() - t0
        for r in stepped:
            if id(r) in out:
                out[id(r)].stamps.append((now, 1))
    for r in reqs:
        if r.finish_reason != "length":
            raise RuntimeError(f"an engine request ended with {r.finish_reason!r} ({r.error}) instead of its "
                               f"{max_tokens} tokens")
        out[id(r)].token_ids, out[id(r)].finish_reason = list(r.output_ids), r.finish_reason
    return [out[id(r)] for r in reqs]


def engine_phase(run_dir: Path, lib: str, device: str, s: Settings, kv_tokens: int, vocab: int,
                 token_ids: dict[str, Any]) -> dict[str, Any]:
    """Decode tok/s of each batch through `Engine` (median of `reps` rounds, fresh prompts each round) in each
    sampling mode; each batch's generated ids go to `token_ids[mode]` (the server's are compared with them)."""
    from vptq_mlc.runtime.engine import Engine

    t0 = time.perf_counter()
    engine = Engine(run_dir, lib, device=device, max_batch_size=max(s.batches), max_total_tokens=kv_tokens,
                    prefix_cache=True)
    res: dict[str, Any] = {"load_s": round(time.perf_counter() - t0, 1), "prefill_chunk": engine.prefill_chunk,
                           "on_device_sampler": engine.device_sampler is not None, "batches": {}}
    try:
        # first calls load kernels: a full prefill chunk, then each batch size for a few steps
        engine_round(engine, [random_prompt(90, warmup_prompt_tokens(s, engine.prefill_chunk), vocab)], 4)
        for b in s.batches:
            for mode in sampling_modes(s):  # the sampler's kernels differ between greedy and sampled rows
                engine_round(engine, [random_prompt(900 + i, s.prompt_tokens, vocab) for i in range(b)], 4, mode)
        for mode in sampling_modes(s):
            res.setdefault(batches_key(mode), {})
            for b in s.batches:
                rounds = [engine_round(engine, [random_prompt(1000 * (rep + 1) + 100 * b + i, s.prompt_tokens,
                                                              vocab) for i in range(b)], s.decode_tokens, mode)
                          for rep in range(s.reps)]
                res[batches_key(mode)][str(b)] = _rounds_summary(rounds)
                token_ids.setdefault(mode, {})[str(b)] = [[t.token_ids for t in r] for r in rounds]
                log.info("engine batch %d (%s): %.1f tok/s", b, mode, res[batches_key(mode)][str(b)]["decode_tok_s"])
    finally:
        engine = None  # noqa: F841 - free device memory before the server loads its own copy
        gc.collect()
    return res


def _rounds_summary(rounds: list[list[Timed]]) -> dict[str, Any]:
    rates = [summed_rate(r) for r in rounds]
    walls = [sum(t.tokens for t in r) / max(t.stamps[-1][0] for t in r) for r in rounds]
    return {"decode_tok_s": statistics.median(rates), "decode_tok_s_rounds": [round(x, 1) for x in rates],
            "wall_tok_s": statistics.median(walls), "tokens_per_stream": [t.tokens for t in rounds[0]],
            "ttft_ms_median": 1e3 * statistics.median(t.ttft for r in rounds for t in r)}


# ---- the server -----------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server started right after)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_server(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """SIGINT (the server drains its streams and exits), killed if it has not ended after `timeout` s."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class ServerProcess:
    """`vptq-mlc serve` in a subprocess on 127.0.0.1 and a free port, stopped (SIGINT, drain) on exit."""

    def __init__(self, run_dir: Path, lib: str, device: str, max_batch: int, kv_tokens: int,
                 log_path: Path | None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-c", "from vptq_mlc.cli import main; main()", "serve", str(run_dir),
                    "--lib", lib, "--device", device, "--host", "127.0.0.1", "--port", str(self.port),
                    "--max-batch-size", str(max_batch), "--max-total-tokens", str(kv_tokens), "--prefix-cache",
                    "--max-queue", "1024"]
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._out: Any = None

    def __enter__(self) -> ServerProcess:
        import httpx

        log.info("starting %s", " ".join(self.cmd))
        self._out = open(self.log_path, "wb") if self.log_path else None  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(self.cmd, stdout=self._out or subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path else ""
                raise RuntimeError(f"the server exited with code {self.proc.returncode} before it was ready\n{tail}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"the server was not ready after {SERVER_START_S:g} s")
            time.sleep(0.25)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_server(self.proc)
        if self._out is not None:
            self._out.close()
            self._out = None


class MalformedStream(RuntimeError):
    """A line outside the server-sent-events framing, or anything after `data: [DONE]`."""


class StreamErrorEvent(RuntimeError):
    """The server ended the stream with an error event."""


class SSEStream:
    """The JSON chunks of an OpenAI-style server-sent-events response (`data: {...}` lines, blank lines between,
    then `data: [DONE]`), for the load clients that check every stream; `done` says whether [DONE] came."""

    def __init__(self, response: Any) -> None:
        self._response = response
        self.done = False

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        async for line in self._response.aiter_lines():
            if not line:
                continue
            if self.done or not line.startswith("data: "):
                raise MalformedStream(f"unexpected line {line[:80]!r}")
            data = line[len("data: "):]
            if data == "[DONE]":
                self.done = True
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                raise StreamErrorEvent(f"stream error: {chunk['error'].get('message')}")
            yield chunk


async def stream_request(client: Any, path: str, body: dict[str, Any]) -> Timed:
    """One streamed request (chat or completions) with `return_token_ids`: its chunks' arrival times, token ids,
    text and usage; an HTTP error or a malformed stream raises."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
    res = Timed()
    t0 = time.perf_counter()
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{path}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        stream = SSEStream(r)
        try:
            async for chunk in stream:
                if chunk.get("usage"):
                    res.usage_tokens = int(chunk["usage"]["completion_tokens"])
                for choice in chunk["choices"]:
                    ids = choice.get("token_ids") or []
                    if ids:
                        res.stamps.append((time.perf_counter() - t0, len(ids)))
                        res.token_ids += ids
                    res.text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                    res.finish_reason = choice.get("finish_reason") or res.finish_reason
        except (MalformedStream, StreamErrorEvent) as e:
            raise RuntimeError(f"{path}: {e}") from None
    if not stream.done or res.usage_tokens != res.tokens:
        raise RuntimeError(f"{path}: malformed stream ([DONE] {stream.done}, usage {res.usage_tokens}, "
                           f"{res.tokens} tokens streamed)")
    return res


def _seed(mode: str, i: int) -> dict[str, int]:
    return {} if mode == "greedy" else {"seed": i}


def completion_body(prompt: list[int], max_tokens: int, mode: str = "greedy", index: int = 0) -> dict[str, Any]:
    """Greedy (temperature 0), or the model's default sampling (no sampling fields: the server fills them in) with
    seed `index`."""
    sampling = {"temperature": 0} if mode == "greedy" else _seed(mode, index)
    return {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, **sampling}


async def server_round(client: Any, prompts: list[list[int]], max_tokens: int, mode: str = "greedy") -> list[Timed]:
    """`engine_round` through the server: the requests sent together, each one stream."""
    streams = await asyncio.gather(*[stream_request(client, "/v1/completions",
                                                    completion_body(p, max_tokens, mode, i))
                                     for i, p in enumerate(prompts)])
    for t in streams:
        if t.tokens != max_tokens:
            raise RuntimeError(f"a stream delivered {t.tokens} of {max_tokens} tokens ({t.finish_reason})")
    return list(streams)


async def metrics(client: Any) -> dict[str, float]:
    """The prefix-cache counters of /metrics (name without the vptq_mlc_ prefix -> value)."""
    text = (await client.get("/metrics")).text
    out = {}
    for name in PREFIX_METRICS:
        m = re.search(rf"^vptq_mlc_{name} (\S+)$", text, re.MULTILINE)
        if m is None:
            raise RuntimeError(f"/metrics has no vptq_mlc_{name}: the server does not count prefix-cache hits")
        out[name] = float(m.group(1))
    return out


async def prefix_phase(client: Any, s: Settings, vocab: int) -> dict[str, Any]:
    """TTFT of first (new prefix) / second (same prefix, other suffix) / control (new prefix) requests, `reps`
    times with fresh prefixes; each with the /metrics prefix-cache deltas it caused."""
    n = s.prefix_tokens
    # warm-up: prefill kernels at this prompt length (a cold first call would inflate the first request's TTFT)
    await stream_request(client, "/v1/completions", completion_body(random_prompt(7, n + SUFFIX_TOKENS, vocab), 2))
    reps = []
    for rep in range(s.reps):
        prefix, other = random_prompt(5000 + rep, n, vocab), random_prompt(6000 + rep, n, vocab)
        suffix_a, suffix_b = random_prompt(7000 + rep, SUFFIX_TOKENS, vocab), random_prompt(8000 + rep, SUFFIX_TOKENS,
                                                                                           vocab)
        row: dict[str, Any] = {}
        for name, prompt in (("first", prefix + suffix_a), ("second", prefix + suffix_b),
                             ("control", other + suffix_b)):
            before = await metrics(client)
            t = await stream_request(client, "/v1/completions", completion_body(prompt, 2))
            after = await metrics(client)
            row[name] = {"ttft_ms": 1e3 * t.ttft, "prompt_tokens": len(prompt),
                         **{k.removeprefix("prefix_cache_").removesuffix("_total"): after[k] - before[k]
                            for k in PREFIX_METRICS}}
        reps.append(row)
        log.info("prefix %d: TTFT first %.1f ms, second %.1f ms, control %.1f ms", rep, row["first"]["ttft_ms"],
                 row["second"]["ttft_ms"], row["control"]["ttft_ms"])
    med = {name: statistics.median(r[name]["ttft_ms"] for r in reps) for name in ("first", "second", "control")}
    return {"prefix_tokens": n, "suffix_tokens": SUFFIX_TOKENS, "reps": reps,
            "ttft_first_ms": med["first"], "ttft_second_ms": med["second"], "ttft_control_ms": med["control"],
            "first_over_second": med["first"] / med["second"], "control_over_second": med["control"] / med["second"],
            "second_hit_tokens": [r["second"]["hit_tokens"] for r in reps],
            "second_hits": [r["second"]["hits"] for r in reps],
            "first_and_control_hits": [r[k]["hits"] for r in reps for k in ("first", "control")]}


async def structured_phase(client: Any, s: Settings) -> dict[str, Any]:
    """Batch-1 decode tok/s: json_schema vs free-form chat requests of the same prompt and token count, greedy and
    (if asked) with the model's default sampling; structured and free alternate, `reps` each (median)."""
    schema = structured_schema(s.items)
    messages = [{"role": "user", "content": STRUCTURED_PROMPT}]
    fmt = {"type": "json_schema", "json_schema": {"name": "digits", "schema": schema, "strict": True}}
    out: dict[str, Any] = {"items": s.items, "schema": schema}
    modes = [("greedy", {"temperature": 0})] + ([("model_sampling", {"seed": 1})] if s.default_sampling else [])
    for mode, sampling in modes:
        structured_body = {"messages": messages, "response_format": fmt, "max_tokens": 4 * s.items + 16, **sampling}
        first = await stream_request(client, "/v1/chat/completions", structured_body)  # also compiles the grammar
        free_body = {"messages": messages, "max_tokens": first.tokens, "ignore_eos": True, **sampling}
        await stream_request(client, "/v1/chat/completions", free_body)
        structured, free = [], []
        for _ in range(s.reps):
            structured.append(await stream_request(client, "/v1/chat/completions", structured_body))
            free.append(await stream_request(client, "/v1/chat/completions",
                                             {**free_body, "max_tokens": structured[-1].tokens}))
        st, fr = statistics.median(t.decode_tok_s() for t in structured), \
            statistics.median(t.decode_tok_s() for t in free)
        out[mode] = {
            "structured_tok_s": st, "free_tok_s": fr, "structured_over_free": st / fr,
            "structured_tok_s_reps": [round(t.decode_tok_s(), 1) for t in structured],
            "free_tok_s_reps": [round(t.decode_tok_s(), 1) for t in free],
            "structured_tokens": [t.tokens for t in structured], "free_tokens": [t.tokens for t in free],
            "structured_finish": [t.finish_reason for t in structured],
            "structured_valid": [follows_schema(t.text, s.items) for t in structured],
            "structured_texts": [t.text for t in structured],
        }
        log.info("structured (%s): %.1f vs free %.1f tok/s", mode, st, fr)
    return out


async def server_phase(url: str, s: Settings, vocab: int, prefill_chunk: int, res: dict[str, Any],
                       engine_ids: dict[str, Any], save: Any) -> None:
    """The same rounds as `engine_phase`, then structured output and prefix caching, into `res` (`save()` after
    each part, so a run cut short keeps what it measured)."""
    import httpx

    limits = httpx.Limits(max_connections=max(s.batches) + 2, max_keepalive_connections=max(s.batches) + 2)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(600.0)) as client:
        await server_round(client, [random_prompt(90, warmup_prompt_tokens(s, prefill_chunk), vocab)], 4)  # as engine
        for b in s.batches:
            for mode in sampling_modes(s):
                await server_round(client, [random_prompt(900 + i, s.prompt_tokens, vocab) for i in range(b)], 4,
                                   mode)
        for mode in sampling_modes(s):
            res[batches_key(mode)] = {}
            for b in s.batches:
                rounds = [await server_round(client, [random_prompt(1000 * (rep + 1) + 100 * b + i, s.prompt_tokens,
                                                                    vocab) for i in range(b)], s.decode_tokens, mode)
                          for rep in range(s.reps)]
                res[batches_key(mode)][str(b)] = summary = _rounds_summary(rounds)
                # same prompts (and seeds), same library: the same tokens unless numerics tie
                summary["tokens_match_engine"] = [[t.token_ids for t in r] for r in rounds] == \
                    engine_ids.get(mode, {}).get(str(b))
                if mode == "greedy":
                    summary["greedy_tokens_match_engine"] = summary["tokens_match_engine"]
                save()
                log.info("server batch %d (%s): %.1f tok/s", b, mode, summary["decode_tok_s"])
        res["structured"] = await structured_phase(client, s)
        save()
        res["prefix"] = await prefix_phase(client, s, vocab)
        save()


# ---- the whole run --------------------------------------------------------------------------------------------


def _kv_tokens(s: Settings, page: int = 16) -> int:
    """KV slots that hold every phase's requests at once (each request reserves prompt + max new tokens)."""
    def pages(n: int) -> int:
        return -(-n // page)

    chat_prompt = 256  # the structured prompt through a chat template, generously
    need = max(max(s.batches) * pages(s.prompt_tokens + s.decode_tokens),
               2 * pages(s.prefix_tokens + SUFFIX_TOKENS + 2),
               pages(chat_prompt + 4 * s.items + 16))
    return page * (need + pages(s.prefix_tokens) * 2)  # + room for cached prefixes


def run_api_bench(model_dir: str | Path, lib: str, device: str, out_json: str | Path, s: Settings,
                  work_dir: str | Path | None = None, tile: int = TILE) -> dict[str, Any]:
    """Measure everything (module docstring) and write `out_json`; returns the same dict."""
    from vptq_mlc.artifact.chat_config import ChatConfig
    from vptq_mlc.bench.e2e_engine import prepare_weights
    from vptq_mlc.bench.e2e_suite import gpu_name
    from vptq_mlc.runtime.library import load_library

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    md = load_library(lib, device).metadata
    compiled_batch = int(md.get("max_batch_size", -1))
    if 0 < compiled_batch < max(s.batches):
        raise ValueError(f"batch {max(s.batches)} exceeds the library's max_batch_size {compiled_batch}; "
                         "lower --batches")
    out_json = Path(out_json)
    server_log = out_json.with_suffix(".server.log")  # kept: the one place a failed GPU run's server output survives
    out_json.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vptq-bench-api-", dir=work_dir) as tmp:
        run_dir, weights = prepare_weights(Path(model_dir), md["params"], Path(tmp) / "model", tile)
        cfg = ChatConfig.load(run_dir)
        window = min(w for w in (cfg.context_window_size, int(md.get("context_window_size", -1))) if w > 0)
        if s.prefix_tokens + SUFFIX_TOKENS + 2 > window or s.prompt_tokens + s.decode_tokens > window:
            raise ValueError(f"the context window is {window} tokens: lower --prefix-tokens ({s.prefix_tokens}) or "
                             f"--prompt-tokens + --decode-tokens ({s.prompt_tokens} + {s.decode_tokens})")
        kv_tokens = s.max_total_tokens or _kv_tokens(s)
        vocab = int(cfg.vocab_size)
        res: dict[str, Any] = {"model_dir": str(model_dir), "lib": os.path.abspath(lib), "device": device,
                               "settings": dataclasses.asdict(s), "kv_tokens": kv_tokens, "context_window": window,
                               "gpu": gpu_name(device), "load_average": os.getloadavg(), **weights}

        def save() -> None:
            with atomic_file(out_json) as f:
                f.write_text(json.dumps(res, indent=1))

        try:
            engine_ids: dict[str, dict[str, Any]] = {}
            res["engine"] = engine_phase(run_dir, lib, device, s, kv_tokens, vocab, engine_ids)
            save()
            res["server"] = {}
            with ServerProcess(run_dir, lib, device, max(s.batches), kv_tokens, server_log) as server:
                chunk = res["engine"]["prefill_chunk"]
                asyncio.run(server_phase(server.url, s, vocab, chunk, res["server"], engine_ids, save))
        except Exception as e:
            res["error"] = f"{type(e).__name__}: {e}"
            save()
            raise
    for mode in sampling_modes(s):
        key = "server_over_engine" + ("" if mode == "greedy" else f"_{mode}")
        res[key] = {b: res["server"][batches_key(mode)][b]["decode_tok_s"] / e["decode_tok_s"]
                    for b, e in res["engine"][batches_key(mode)].items()}
    save()
    return res


def report_table(res: dict[str, Any]) -> str:
    """The run's headline figures as a markdown table (targets: structured >= 0.9x free, TTFT ratio >= 5,
    server >= 0.85x engine)."""
    rows = []
    st = res["server"]["structured"]
    for mode in ("greedy", "model_sampling"):
        if mode in st:
            m = st[mode]
            rows.append((f"b1 json_schema vs free ({mode}), tok/s", f"{m['structured_tok_s']:.1f}",
                         f"{m['free_tok_s']:.1f}", f"{m['structured_over_free']:.3f}", ">= 0.90"))
    p = res["server"]["prefix"]
    rows.append((f"TTFT {p['prefix_tokens']}-token prefix: first vs second, ms", f"{p['ttft_first_ms']:.1f}",
                 f"{p['ttft_second_ms']:.1f}", f"{p['first_over_second']:.2f}", ">= 5"))
    rows.append(("TTFT control (new prefix) vs second, ms", f"{p['ttft_control_ms']:.1f}",
                 f"{p['ttft_second_ms']:.1f}", f"{p['control_over_second']:.2f}", ""))
    rows.append(("second request's prefix-cache hit tokens (/metrics)", str(p["second_hit_tokens"]), "", "", ""))
    for mode in ("greedy", "model_sampling"):
        key = "server_over_engine" + ("" if mode == "greedy" else f"_{mode}")
        for b, ratio in res.get(key, {}).items():
            server, engine = res["server"][batches_key(mode)][b], res["engine"][batches_key(mode)][b]
            rows.append((f"b{b} decode tok/s: server vs engine ({mode})", f"{server['decode_tok_s']:.1f}",
                         f"{engine['decode_tok_s']:.1f}", f"{ratio:.3f}", ">= 0.85"))
    lines = ["| measure | a | b | a/b | target |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
