"""The inference engine: a model library + weights + paged KV cache, driven by a step-able scheduler.

`step()` runs the active requests through the model once. While no admitted request has prompt left, that is
one batched decode (`batch_decode`, or the static `decode` / `batch_decode_b<n>` functions) for every running
request. While some prompt is left, it is one `batch_prefill` call: with no request decoding, prompt chunks
packed up to `prefill_chunk_size` tokens; with requests decoding, their decode tokens (one each) plus prompt
chunks under `step_token_budget` tokens, so a long prompt arriving does not pause the running streams.
A request is admitted only when
the KV pages for its whole budget (prompt + max new tokens) are free, so a running request never runs out
of pages; its pages go back when it finishes or is cancelled. `generate`/`chat` are thin loops over
`step()`, so a server can add requests between steps (continuous batching) through the same path.

On a GPU, decode steps overlap with the host's work (`overlap`): while the batch stays the same, a step queues the
next decode call, fed the tokens the device sampler left on the device, before it reads its own tokens back; the
next call's sampling is queued once those tokens are in (penalties, constraints and stop checks see them), while
the GPU still runs that call. The host's per-step work (reading tokens, detokenizing, stop checks, launches) then
runs while the GPU computes. A row queued for a request that then finishes (a stop token, a stop string) is
dropped: its KV write lies within the pages the request reserved.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm.runtime import ShapeTuple

from vptq_mlc.artifact import sampler_abi
from vptq_mlc.artifact.chat_config import ChatConfig
from vptq_mlc.errors import GenerationError, RuntimeLoadError
from vptq_mlc.runtime.device import DeviceLike, Placement, find_library, parse_placement, resolve_device
from vptq_mlc.runtime.device_sampler import DeviceSampler, PendingSample, SampleRow
from vptq_mlc.runtime.frontend import RequestFrontend
from vptq_mlc.runtime.kv_cache import PrefixCache
from vptq_mlc.runtime.library import CompiledModel, first_line, load_library
from vptq_mlc.runtime.memory import free_memory_bytes, kv_bytes_per_token, kv_cache_tokens
from vptq_mlc.runtime.request import Request, RequestState
from vptq_mlc.runtime.sampling import SamplingParams, TokenConstraint
from vptq_mlc.runtime.split import SplitModel

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 4  # concurrent sequences unless asked otherwise (capped by the library's max_batch_size)
# Tokens of one step that mixes decoding requests with prompt chunks (capped by the prefill chunk): small enough
# that the step costs a few decode steps, large enough that a long prompt still finishes in a few dozen steps.
DEFAULT_STEP_TOKEN_BUDGET = 256


@dataclass
class _QueuedDecode:
    """A queued decode call of one batch piece: its logits on the device, then (once queued) their sampling, whose
    tokens are on their way to the host."""

    batch: list[Request]
    logits: Any  # [rows, vocab] on the device
    sample: PendingSample | None = None


class Engine:
    """Load once, then `generate`, `chat`, or `add_request` + `step` for many concurrent requests.

    Not thread-safe: call every method from one thread (a server runs its step loop and request handling
    there, and hands text deltas to other threads or tasks).
    """

    def __init__(
        self,
        model_dir: str | Path,
        lib_path: str | Path | None = None,
        device: DeviceLike | Placement = "cpu",
        max_batch_size: int | None = None,
        context_window: int | None = None,
        prefill_chunk_size: int | None = None,
        max_total_tokens: int | None = None,
        page_size: int = 16,
        devices: Sequence[str] | str | None = None,
        prefix_cache: bool = False,
        step_token_budget: int | None = None,
        overlap: bool | None = None,
    ) -> None:
        """Sizes left as None come from mlc-chat-config.json, bounded by the library's `_metadata`.

        `max_total_tokens`: KV slots shared by all sequences (default: 90% of the memory free after the weights,
        at most max_batch_size context windows; runtime/memory.py).
        `device`: a Placement (what the CLI parsed), a DeviceSpec, or a device string ("auto" = None: the first
        present of cuda, rocm, cpu). `devices`: several devices (e.g. "cuda:0,cuda:1") split the decoder layers
        over them (runtime/split.py; the library needs `--split-functions`); one device is the same as `device`.
        `prefix_cache`: keep finished requests' KV pages (LRU, evicted when admissions need the pages) and start
        later requests that share a prefix from them (one device, no sliding window).
        `step_token_budget`: tokens per step while requests decode and prompts are left (their decode tokens plus
        prompt chunks; default 256, at most the prefill chunk); 0 runs prompts in steps of their own instead, which
        pause every decoding request for the whole prompt.
        `overlap`: queue each decode step before reading the previous one's tokens (module docstring); default on
        where the device sampler copies asynchronously (CUDA), off elsewhere (True forces it, for tests).
        """
        self.model_dir = Path(model_dir)
        self.config = ChatConfig.load(self.model_dir)
        self.placement = parse_placement(device, devices)
        if lib_path is None:
            lib_path = find_library(self.model_dir, resolve_device(self.placement.first)[0])
            log.info("using model library %s", lib_path)
        self.lib: CompiledModel = (SplitModel(lib_path, self.placement.devices) if self.placement.split
                                   else load_library(lib_path, self.placement.first))

        md = self.lib.metadata
        self.context_window = self._limit("context window", context_window, self.config.context_window_size,
                                          md.get("context_window_size", -1))
        # a library built for longer prefill calls than the model dir says (a CUDA build) runs them by default
        compiled_chunk = md.get("prefill_chunk_size", -1)
        self.prefill_chunk = self._limit("prefill chunk", prefill_chunk_size,
                                         max(self.config.prefill_chunk_size, compiled_chunk), compiled_chunk)
        self.max_batch = self._limit("max batch size", max_batch_size, DEFAULT_MAX_BATCH, md.get("max_batch_size", -1))
        if step_token_budget is not None and step_token_budget < 0:
            raise RuntimeLoadError(f"step token budget {step_token_budget} is negative; "
                                   "give a number of tokens, or 0 to keep prompts out of decode steps")
        self.step_token_budget = min(DEFAULT_STEP_TOKEN_BUDGET if step_token_budget is None else step_token_budget,
                                     self.prefill_chunk)
        self.frontend = RequestFrontend(self.model_dir, self.config, self.context_window)
        self.tokenizer, self.chat_template = self.frontend.tokenizer, self.frontend.chat_template
        self.params = self.lib.load_params(self.model_dir, self.config.model_config)
        kv_tokens = kv_cache_tokens(max_total_tokens, kv_bytes_per_token(self.config.model_config,
                                                                         self.config.model_dtype, md.get("kv_cache")),
                                    free_memory_bytes(self.lib.device), self.max_batch, self.context_window, page_size,
                                    str(self.lib.device))
        self.max_total_tokens = kv_tokens
        try:
            self.kv = self.lib.create_kv_cache(self.max_batch, kv_tokens, self.prefill_chunk, page_size,
                                               int(md.get("sliding_window_size", self.config.sliding_window_size)),
                                               int(md.get("attention_sink_size", -1)))
        except Exception as e:  # noqa: BLE001 - TVM reports a failed allocation as std::bad_alloc or a TVMError
            raise RuntimeLoadError(f"cannot allocate a KV cache of {kv_tokens} tokens on {self.lib.device} "
                                   f"({first_line(e)}); lower --max-total-tokens") from e
        self.prefix_cache = PrefixCache(self.kv) if prefix_cache and self.lib.prefix_cacheable \
            and self.kv.sliding_window <= 0 else None
        if prefix_cache and self.prefix_cache is None:
            log.warning("prefix caching is off: it needs one device and no sliding window")
        self.prefill_tokens = 0  # prompt tokens run through the model (prefix-cache hits skip theirs)
        self._decoded: dict[int, int] = {}  # seq id -> decode steps fed (the KV of a finished request)
        self.vocab_size, self.active_vocab = self.frontend.vocab_size, self.frontend.active_vocab
        self.eos_token_ids = self.frontend.eos_token_ids
        self._embed, self._prefill, self._decode = (self.lib.func(n)
                                                    for n in ("embed", "batch_prefill", "batch_decode"))
        # Static decode functions (`decode` for one sequence, `batch_decode_b<n>` where the library has them) run
        # GPU libraries' decode kernels; `batch_decode`'s symbolic batch gets the general matmul. So a decode batch
        # is split into pieces of static sizes when the library has them (`_decode_pieces`).
        self._static_decode = {1: self.lib.func("decode")} if self.lib.has("decode") else {}
        self._static_decode.update({n: self.lib.func(f"batch_decode_b{n}") for n in range(2, self.max_batch + 1)
                                    if self.lib.has(f"batch_decode_b{n}")})
        self._reshape = tvm.get_global_func("vm.builtin.reshape")
        self.device_sampler = self._load_device_sampler()
        if overlap is None:
            overlap = self.device_sampler is not None and self.device_sampler.link.asynchronous
        self.overlap = bool(overlap) and self.device_sampler is not None and not self.placement.split
        self._queued: list[_QueuedDecode] = []  # decode calls whose tokens the next step() reads
        self._decode_queued = False  # a decode call was queued and the device not synchronised since
        self._seq_ids = itertools.count()
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        log.info("engine ready: context %d, prefill chunk %d, step token budget %d, batch %d, %d KV pages of %d",
                 self.context_window, self.prefill_chunk, self.step_token_budget, self.max_batch, self.kv.total_pages,
                 page_size)

    @staticmethod
    def _limit(what: str, asked: int | None, configured: int, compiled: int) -> int:
        """asked (or the config value) bounded by what the library was compiled for (-1 = no bound)."""
        value = asked if asked is not None else configured
        if value is None or value <= 0:
            value = compiled
        if value <= 0:
            raise RuntimeLoadError(
                f"the {what} is unknown (not in mlc-chat-config.json or _metadata); pass it explicitly"
            )
        if compiled > 0 and value > compiled:
            if asked is not None:
                raise RuntimeLoadError(f"{what} {value} is larger than the library was compiled for ({compiled}); "
                                       f"use at most {compiled} or recompile")
            value = compiled
        return int(value)

    def _load_device_sampler(self) -> DeviceSampler | None:
        """The library's compiled sampler (logits stay on the device), or None: sample on the host in numpy."""
        reason = self.lib.host_sampling_reason()
        if reason is not None:
            log.info("sampling on the host (numpy): %s", reason)
            return None
        log.info("sampling on the device (the library's %s)", sampler_abi.FUNCTION)
        return DeviceSampler(self.lib.func(sampler_abi.FUNCTION), self.lib.device)

    # ---- requests -------------------------------------------------------------------------------------

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                    constraint: TokenConstraint | None = None) -> Request:
        """Queue a request (text is encoded with the tokenizer's special tokens, e.g. BOS).

        `constraint`: structured output; the sampler only picks tokens it allows at each step. `params` was
        validated when built (`frontend.sampling_params` fills the model's defaults)."""
        params = params or SamplingParams()
        ids = self.frontend.prompt_ids(prompt)
        if not ids:
            raise GenerationError("the prompt is empty; give at least one token")
        if self.vocab_size > 0 and not all(0 <= t < self.vocab_size for t in ids):
            bad = next(t for t in ids if not 0 <= t < self.vocab_size)
            raise GenerationError(
                f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1}); fix the prompt ids"
            )
        if len(ids) >= self.context_window:
            raise GenerationError(f"the prompt is {len(ids)} tokens but the context window is {self.context_window}; "
                                  "shorten the prompt (or /reset the chat) or use a larger --context-window")
        budget = min(params.max_tokens, self.context_window - len(ids))
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        req = Request(ids, params, frozenset(stop_ids), budget, self.tokenizer.stream(), constraint=constraint)
        req.reserved_pages = self.kv.pages_for(len(ids) + budget)
        if req.reserved_pages > self.kv.total_pages:
            raise GenerationError(f"the request needs {len(ids) + budget} KV tokens but the cache holds "
                                  f"{self.kv.total_pages * self.kv.page_size}; lower max_tokens or raise "
                                  "max_total_tokens")
        self.waiting.append(req)
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request now and free its KV pages."""
        if req.state is RequestState.WAITING:
            self.waiting.remove(req)
        if not req.finished:
            req.finish_reason = req.finish_reason or "cancelled"
            self._finish(req)

    def reset(self) -> None:
        """Drop every request and clear the KV cache."""
        for req in [*self.running, *self.waiting]:
            self.cancel(req)
        for queued in self._queued:  # their requests are cancelled; let the copies land before the buffers are reused
            queued.sample.picks()
        self._queued = []
        self.kv.clear()
        if self.prefix_cache is not None:
            self.prefix_cache.clear()

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    def _finish(self, req: Request) -> None:
        if req.seq_id is not None and req.state is RequestState.RUNNING:
            decoded = self._decoded.pop(req.seq_id, 0)
            if self.prefix_cache is not None and req.finish_reason != "error" and req.prefilled > 0:
                if decoded > len(req.output_ids):  # a step queued before the stop token was read fed it too
                    self.kv.popn(req.seq_id, decoded - len(req.output_ids))
                self.prefix_cache.insert(req.seq_id, req.prompt_ids[: req.prefilled] + req.output_ids[:decoded])
            else:
                self.kv.remove(req.seq_id)
            self.running.remove(req)
        req.state = RequestState.FINISHED
        req.finished_at = time.perf_counter()

    def _admit(self) -> None:
        reserved = sum(r.reserved_pages for r in self.running)
        cache = self.prefix_cache
        while self.waiting and len(self.running) < self.max_batch:
            req = self.waiting[0]
            while cache is not None and cache.entries and \
                    reserved + req.reserved_pages + cache.pages > self.kv.total_pages:
                cache.evict()  # cached prefixes give their pages back before anyone waits for them
            if reserved + req.reserved_pages > self.kv.total_pages:
                break  # FIFO: wait for pages rather than let a later, smaller request overtake
            if cache is not None and any(not r.prefill_done and cache.shared_length(r.prompt_ids, req.prompt_ids)
                                         >= self.kv.page_size for r in self.running):
                break  # its prefix is being prefilled right now (n choices, a burst of one system prompt): fork it next
            self.waiting.popleft()
            req.seq_id = next(self._seq_ids)
            live = [(r.seq_id, r.prompt_ids + r.output_ids[: self._decoded.get(r.seq_id, 0)])
                    for r in self.running if r.prefill_done]
            hit = cache.match(req.prompt_ids, self.kv.page_size, live) if cache is not None else None
            if hit is not None:
                self.kv.fork(hit[0], req.seq_id, hit[1])
                req.prefilled = hit[1]
            else:
                self.kv.add(req.seq_id)
            req.state = RequestState.RUNNING
            reserved += req.reserved_pages
            self.running.append(req)

    # ---- model calls ----------------------------------------------------------------------------------

    def _device_ids(self, ids: list[int]) -> Any:
        return tvm.runtime.tensor(np.asarray(ids, dtype=np.int32), self.lib.device)

    def _embed_ids(self, ids: list[int], shape: list[int]) -> Any:
        return self._embed_tensor(self._device_ids(ids), shape)

    def _host_ids(self, batch: list[Request]) -> Any:
        """The decode inputs of `batch` (each request's last token) from the host."""
        return self._device_ids([r.next_input() for r in batch])

    def _embed_tensor(self, ids: Any, shape: list[int]) -> Any:
        """Embeddings of a device int32 tensor of token ids, shaped [*shape, hidden]."""
        emb = self._embed(ids, self.params)
        return self._reshape(emb, ShapeTuple([*shape, int(emb.shape[-1])]))

    def _run(self, batch: list[Request], lengths: list[int], call: Any) -> Any:
        """One model call between begin/end_forward, returning its logits where they are (on the device); on
        failure the batch's requests are dropped."""
        try:
            with self.kv.forward([r.seq_id for r in batch], lengths) as kv:
                out = call(kv)
            return out[0]
        except Exception:
            for r in batch:
                r.finish_reason = "error"
                self._finish(r)
            raise

    def _decode_pieces(self, batch: list[Request]) -> list[list[Request]]:
        """The running batch as pieces whose sizes have static decode functions, largest first (CUDA: 16 -> one
        tensor-core call, 11 -> 8 + 3), or as one call of the symbolic `batch_decode` when the library has none."""
        sizes = sorted((n for n in self._static_decode if n > 1), reverse=True)
        if not sizes or len(batch) in self._static_decode:
            return [batch]
        pieces, i = [], 0
        while i < len(batch):
            n = next((m for m in sizes if m <= len(batch) - i), 1)
            pieces.append(batch[i : i + n])
            i += n
        return pieces

    def _prefill_plan(self) -> tuple[list[Request], list[int]] | None:
        """The requests and token counts of this step's `batch_prefill` call, or None for a pure decode step.

        Decoding requests come first with one token each when prompts are left and the step token budget leaves
        room for at least one prompt token; the prompts then fill the rest of the budget in admission order. With
        nobody decoding (or mixing off) the prompts fill a whole prefill chunk, as fast as the library allows."""
        prefilling = [r for r in self.running if not r.prefill_done]
        if not prefilling:
            return None
        decoding = [r for r in self.running if r.prefill_done]
        room = self.step_token_budget - len(decoding)
        if not decoding or room < 1:
            decoding, room = [], self.prefill_chunk
        batch, lengths = list(decoding), [1] * len(decoding)
        for r in prefilling:
            n = min(room, len(r.prompt_ids) - r.prefilled)
            if n <= 0:
                break
            batch.append(r)
            lengths.append(n)
            room -= n
        return batch, lengths

    def step(self) -> list[Request]:
        """One model call (a decode step, or a `batch_prefill` of prompt chunks that may carry the decoding
        requests' tokens too). Returns the requests that got a new token in this step.

        With `overlap`, a decode step's tokens are read by the next call, after it has queued the following step
        (module docstring)."""
        queued, self._queued = self._queued, []
        if queued:
            ahead = []
            if self._can_overlap([r for q in queued for r in q.batch]):
                sampler = self.device_sampler
                ahead = [self._queue_decode(q.batch, sampler.next_input_ids(q.sample.launch)) for q in queued]
            stepped = [r for q in queued for r in self._take_picks(q.batch, q.sample.picks())]
            self._queued = [self._queue_sampling(q) for q in ahead]  # after the tokens: penalties, masks see them
            if stepped or self._queued:
                return stepped
            # every row of the queued step belonged to a request that has finished since: a step of its own
        self._admit()
        if not self.running:
            return []
        plan = self._prefill_plan()
        if plan is not None:
            batch, lengths = plan
            ids: list[int] = []
            for r, n in zip(batch, lengths):  # a decoding request's entry is its one decode token
                ids += [r.next_input()] if r.prefill_done else r.prompt_ids[r.prefilled : r.prefilled + n]
            emb = self._embed_ids(ids, [1, len(ids)])
            pos = tvm.runtime.tensor(np.cumsum(lengths, dtype=np.int32) - 1, self.lib.device)
            logits = self._run(batch, lengths, lambda kv: self._prefill(emb, pos, kv, self.params))
            for r, n in zip(batch, lengths):
                if r.prefill_done:  # a decode token carried by this call
                    self._decoded[r.seq_id] = self._decoded.get(r.seq_id, 0) + 1
                else:
                    r.prefilled += n
                    self.prefill_tokens += n
            return self._sample(logits, batch, [r.prefill_done for r in batch])
        pieces = self._decode_pieces(list(self.running))
        if self._can_overlap(self.running):
            self._queued = [self._queue_sampling(self._queue_decode(b, self._host_ids(b))) for b in pieces]
            return self.step()  # queues the step after, then reads this one's tokens
        stepped = []
        for batch in pieces:
            stepped += self._sample(self._decode_call(batch, self._host_ids(batch)), batch, [True] * len(batch))
        return stepped

    def _overlappable(self, r: Request) -> bool:
        """Whether a decode step can be queued for this request before its last token reaches the host: the token
        in flight cannot end it by length (it would only waste the queued row)."""
        return r.prefill_done and len(r.output_ids) + 1 < r.max_new_tokens

    def _can_overlap(self, batch: list[Request]) -> bool:
        """Queue a decode step of `batch` before the current one's tokens are read: overlap is on, nobody waits to
        be admitted, `batch` is every running request and each of them allows it."""
        return (self.overlap and not self.waiting and batch == self.running
                and all(self._overlappable(r) for r in batch))

    def _decode_call(self, batch: list[Request], ids: Any) -> Any:
        """One decode call of `batch` fed `ids` (a device tensor); returns its [rows, vocab] logits, left on the
        device, and counts the fed tokens.

        The KV cache keeps one set of per-call arrays on the device (page tables, positions) and copies the next
        call's into it, at the call's first attention, on a stream of its own that does not wait for queued kernels.
        So while a queued decode call may still be running, the host synchronises the device (releasing the
        interpreter meanwhile) before launching the next one, whose embedding is already queued: the GPU idles only
        from its last queued kernel to this call's first."""
        emb = self._embed_tensor(ids, [len(batch), 1])
        decode = self._static_decode.get(len(batch), self._decode)

        def call(kv: Any) -> Any:
            if self._decode_queued:
                self.lib.device.sync()
                self._decode_queued = False
            return decode(emb, kv, self.params)

        logits = self._run(batch, [1] * len(batch), call)
        for r in batch:
            self._decoded[r.seq_id] = self._decoded.get(r.seq_id, 0) + 1
        return self._reshape(logits, ShapeTuple([len(batch), int(logits.shape[-1])]))

    def _queue_decode(self, batch: list[Request], ids: Any) -> _QueuedDecode:
        """`_decode_call` whose tokens are read only after the next call is queued."""
        logits = self._decode_call(batch, ids)
        self._decode_queued = True
        return _QueuedDecode(batch, logits)

    def _queue_sampling(self, queued: _QueuedDecode) -> _QueuedDecode:
        """Queue the sampling of a queued decode call and the copy of its tokens; nothing is read back. A request
        finished since is a skipped row; one whose row fails to build (its constraint raising) ends alone."""
        seen = self.active_vocab or int(queued.logits.shape[-1])
        rows = []
        for r in queued.batch:
            row = SampleRow(r.params, skip=True)
            if not r.finished:
                try:
                    row = r.sample_row(seen)
                except Exception as e:  # noqa: BLE001 - one request's sampling failure ends that request
                    self._end_with_error(r, e)
            rows.append(row)
        queued.sample = self.device_sampler.sample_later(queued.logits, rows, self.active_vocab)
        return queued

    def _take_picks(self, batch: list[Request], picks: list[tuple[int, Any]]) -> list[Request]:
        tokens = [-1 if r.finished else r.take_sample(token, logprob) for r, (token, logprob) in zip(batch, picks)]
        return self._append_tokens(batch, [True] * len(batch), tokens, {})

    def _sample(self, logits: Any, batch: list[Request], wanted: list[bool]) -> list[Request]:
        """Sample the next token of each wanted row of `logits` (one row per request of `batch`) and append it.
        One request's failure (its constraint raising, say) ends that request, not the batch."""
        vocab = int(logits.shape[-1])
        failed: dict[int, Exception] = {}
        tokens = [-1] * len(batch)
        if self.device_sampler is not None:
            flat = self._reshape(logits, ShapeTuple([len(batch), vocab]))
            seen = self.active_vocab or vocab  # a constraint's bitmask covers the tokens the host sampler would see
            rows = [SampleRow(r.params, skip=True) for r in batch]
            for i, (r, w) in enumerate(zip(batch, wanted)):
                try:
                    rows[i] = r.sample_row(seen) if w else rows[i]
                except Exception as e:  # noqa: BLE001 - recorded on the request below
                    failed[i] = e
            picks = self.device_sampler.sample(flat, rows, self.active_vocab)
            for i, (r, w, (token, logprob)) in enumerate(zip(batch, wanted, picks)):
                if w and i not in failed:
                    tokens[i] = r.take_sample(token, logprob)
        else:
            host = logits.numpy().reshape(len(batch), vocab)[:, : self.active_vocab or vocab]
            for i, (r, w, row) in enumerate(zip(batch, wanted, host)):
                try:
                    tokens[i] = r.sample(row) if w else -1
                except Exception as e:  # noqa: BLE001 - recorded on the request below
                    failed[i] = e
        return self._append_tokens(batch, wanted, tokens, failed)

    def _end_with_error(self, r: Request, e: Exception) -> None:
        """End request `r` because its sampling failed (`Request.error` says why); the batch goes on."""
        log.exception("sampling failed for %r", r)
        r.finish_reason, r.error = "error", f"{type(e).__name__}: {e}"
        self._finish(r)

    def _append_tokens(self, batch: list[Request], wanted: list[bool], tokens: list[int],
                       failed: dict[int, Exception]) -> list[Request]:
        """Append each wanted row's token to its request (a failure ends that request only); finished requests
        (a row queued before its request stopped) are skipped."""
        stepped = []
        for i, (r, w, token) in enumerate(zip(batch, wanted, tokens)):
            if not w or r.finished:
                continue
            try:
                if i in failed:
                    raise failed[i]
                r.append(token)
            except Exception as e:  # noqa: BLE001 - one request's sampling failure ends that request, not the batch
                self._end_with_error(r, e)
                continue
            stepped.append(r)
            if r.finish_reason is not None:
                self._finish(r)
        return stepped

    # ---- convenience loops ----------------------------------------------------------------------------

    def _stream(self, req: Request) -> Iterator[str]:
        try:
            while not req.finished:
                self.step()
                delta = req.pop_delta()
                if delta:
                    yield delta
        finally:
            self.cancel(req)  # no-op when finished; frees the pages when the caller stops early

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 256, temperature: float | None = None,
                 top_p: float | None = None, top_k: int = 0, repetition_penalty: float | None = None,
                 seed: int | None = None, stop: str | list[str] | None = None, stream: bool = False,
                 stop_token_ids: list[int] | None = None, presence_penalty: float | None = None,
                 frequency_penalty: float | None = None) -> str | Iterator[str]:
        """Complete `prompt` (text or token ids). Returns the text, or an iterator of text deltas if `stream`."""
        params = self.frontend.sampling_params(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            repetition_penalty=repetition_penalty, seed=seed, stop=stop, stop_token_ids=stop_token_ids,
            presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)
        req = self.add_request(prompt, params)
        it = self._stream(req)
        return it if stream else "".join(it)

    def render_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """Prompt ids for a conversation, through the model's chat template (special tokens come from it)."""
        return self.frontend.render_chat(messages)

    def chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> str | Iterator[str]:
        """`generate` on the chat-templated conversation; same keyword arguments."""
        return self.generate(self.render_chat(messages), **kwargs)
