"""The one engine loop of the server: a thread that owns the `Engine` and is the only caller of its methods.

Why a thread: `Engine.step()` is a blocking model call (milliseconds to tens of milliseconds) and the engine is
single-threaded, so it runs beside the asyncio event loop instead of in it. HTTP handlers hand requests in
through a thread-safe inbox (`submit`, `cancel`); between two steps the loop takes everything in the inbox, so
new requests join the running batch and finished ones leave it (continuous batching: admission and page
accounting are the engine's). Tokens go back as `Event`s on each request's asyncio queue through
`loop.call_soon_threadsafe`, one call per event loop per step.

Back-pressure: at most `max_batch_size + max_queue` requests may be open at once (in the inbox, waiting for
admission, or running), so `max_queue` counts only requests beyond the free batch slots and an idle server takes a
full batch at once; `submit` past that raises `QueueFullError`, which the app answers with 503.

Isolation: whatever one request raises (its sampling parameters, its sampler, a bug) ends that request with an
error event; the loop and the other requests go on. Draining (`begin_drain`, then `abort_all` at the deadline)
refuses new requests and lets the running ones finish.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from vptq_mlc.errors import VPTQMLCError
from vptq_mlc.runtime.engine import Engine
from vptq_mlc.runtime.request import Request, RequestState
from vptq_mlc.runtime.sampling import SamplingParams, TokenConstraint, TokenLogprob
from vptq_mlc.serve.metrics import EngineGauges, ServeMetrics

log = logging.getLogger(__name__)

_STOP = object()


class QueueFullError(Exception):
    """More requests are waiting for admission than the server's --max-queue allows."""


class WorkerStoppedError(Exception):
    """The engine loop is not running (not started, shutting down, or failed)."""


@dataclass
class Event:
    """One message from the engine loop to a handler.

    The first event of a request is its acceptance (`prompt_tokens` set) or an error; then text deltas; the
    last one has `finish_reason` (stop, length, cancelled) or `error`.
    """

    text: str = ""
    token_ids: list[int] = field(default_factory=list)  # generated since the previous event
    completion_tokens: int = 0
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    error: str | None = None
    status: int = 500
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of `token_ids`, when the request asked for them


class Stream:
    """The handler's end of one request. Created by `EngineWorker.submit` inside the handler's event loop."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams,
                 constraint: TokenConstraint | None = None) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self.constraint = constraint
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.submitted_at = time.perf_counter()
        # engine-loop side (touched only by the worker thread)
        self.request: Request | None = None
        self.queued = True  # counted against max_queue until admitted or refused
        self.sent_tokens = 0
        self.got_token = False
        self.done = False

    async def next(self) -> Event:
        return await self.queue.get()


class EngineWorker:
    """Runs `engine.step()` while work exists; the HTTP side only calls `submit`, `cancel` and `alive`."""

    def __init__(self, engine: Engine, max_queue: int = 64, metrics: ServeMetrics | None = None) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.engine = engine
        self.frontend = engine.frontend  # what the HTTP side reads (tokenizer, template, defaults): thread-safe
        self.max_queue = max_queue
        self.metrics = metrics or ServeMetrics()
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued = 0
        self._open = 0  # submitted and not yet done (inbox, waiting or running)
        self._closed = False
        self.draining = False
        self._streams: dict[Request, Stream] = {}
        self._waiting: list[Stream] = []
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None
        self._report()

    # ---- called from the HTTP side ----

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vptq-mlc-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the loop: requests still in flight get an error event."""
        if self._thread is not None:
            self._inbox.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def queue_length(self) -> int:
        with self._lock:
            return self._queued

    def open_requests(self) -> int:
        """Requests submitted and not yet answered to the end (queued or running)."""
        with self._lock:
            return self._open

    def begin_drain(self) -> None:
        """Refuse new requests (503); the open ones go on."""
        self.draining = True

    def abort_all(self, message: str) -> None:
        """End every open request now with an error event carrying `message` (503)."""
        self._inbox.put(("abort", message))

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               constraint: TokenConstraint | None = None) -> Stream:
        """Queue a request; its events arrive on the returned stream. Raises QueueFullError past max_queue."""
        with self._lock:
            if self.draining:
                raise WorkerStoppedError("the server is shutting down; retry on another server")
            if self._closed or not self.alive():
                reason = f"it failed: {self.failure}" if self.failure else "it is not running"
                raise WorkerStoppedError(f"the engine loop cannot take requests ({reason}); restart the server")
            if self._open >= self.engine.max_batch + self.max_queue:
                raise QueueFullError(f"the server is at capacity: {self._open - self._queued} requests running and "
                                     f"{self._queued} waiting (--max-batch-size {self.engine.max_batch}, "
                                     f"--max-queue {self.max_queue}); retry later")
            self._queued += 1
            self._open += 1
        stream = Stream(prompt_ids, params, constraint)
        self._inbox.put(("add", stream))
        return stream

    def cancel(self, stream: Stream) -> None:
        """Stop the request (client gone) and free its KV pages; a no-op once it finished."""
        self._inbox.put(("cancel", stream))

    # ---- the engine loop (worker thread only) ----

    def _run(self) -> None:
        try:
            while self._drain(block=not self.engine.has_unfinished()):
                if self.engine.has_unfinished():
                    self._step()
        except BaseException as e:  # noqa: BLE001 - reported through /health and to every open request
            log.exception("the engine loop stopped")
            self.failure = e
        finally:
            self._shutdown()

    def _drain(self, block: bool) -> bool:
        """Apply every queued command; False when asked to stop."""
        cmds = [self._inbox.get()] if block else []
        while True:
            try:
                cmds.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        events: list[tuple[Stream, Event]] = []
        running = True
        for cmd in cmds:
            if cmd is _STOP:
                running = False
            elif cmd[0] == "add":
                self._add(cmd[1], events)
            elif cmd[0] == "abort":
                self._abort(cmd[1], events)
            else:
                try:
                    self._cancel(cmd[1], events)
                except Exception:  # noqa: BLE001 - a cancel that fails must not end the loop
                    log.exception("cancelling a request failed")
        if cmds:
            self._report()
        self._emit(events)
        return running

    def _add(self, stream: Stream, events: list[tuple[Stream, Event]]) -> None:
        try:
            req = self.engine.add_request(stream.prompt_ids, stream.params, constraint=stream.constraint)
        except Exception as e:  # noqa: BLE001 - ours are the client's fault (400), anything else is ours (500)
            client_fault = isinstance(e, VPTQMLCError)
            if not client_fault:
                log.exception("adding a request failed")
            self._unqueue(stream)
            self._mark_done(stream)
            events.append((stream, Event(error=str(e) if client_fault else f"the request failed: {type(e).__name__}: "
                                         f"{e}", status=400 if client_fault else 500)))
            return
        stream.request = req
        self._streams[req] = stream
        self._waiting.append(stream)
        self.metrics.request_started(len(req.prompt_ids))
        events.append((stream, Event(prompt_tokens=len(req.prompt_ids))))

    def _cancel(self, stream: Stream, events: list[tuple[Stream, Event]]) -> None:
        req = stream.request
        if req is None or stream.done:
            return
        self.engine.cancel(req)
        self._close(stream, Event(text=req.pop_delta(), completion_tokens=len(req.output_ids),
                                  finish_reason=req.finish_reason), events)

    def _abort(self, message: str, events: list[tuple[Stream, Event]]) -> None:
        """End every open request with an error event (the drain deadline passed)."""
        for req, stream in list(self._streams.items()):
            try:
                self.engine.cancel(req)
            except Exception:  # noqa: BLE001 - the others must still be ended
                log.exception("cancelling a request failed")
            self._close(stream, Event(text=req.pop_delta(), token_ids=req.output_ids[stream.sent_tokens :],
                                      completion_tokens=len(req.output_ids), finish_reason=req.finish_reason,
                                      error=message, status=503), events)

    def _mark_done(self, stream: Stream) -> None:
        if not stream.done:
            stream.done = True
            with self._lock:
                self._open -= 1

    def _close(self, stream: Stream, last: Event, events: list[tuple[Stream, Event]]) -> None:
        assert stream.request is not None
        self._mark_done(stream)
        self._streams.pop(stream.request, None)
        self._unqueue(stream)
        self.metrics.request_finished(stream.request.finish_reason or "error")
        events.append((stream, last))

    def _step(self) -> None:
        failure = None
        t0 = time.perf_counter()
        try:
            stepped = self.engine.step()
        except Exception as e:  # noqa: BLE001 - the engine dropped that batch (finish_reason "error"); keep serving
            log.exception("engine step failed")
            stepped, failure = [], f"{type(e).__name__}: {e}"
            if not any(req.finished for req in self._streams):  # failed outside a model call: drop the batch
                for req in list(self.engine.running):
                    req.finish_reason = "error"
                    self.engine.cancel(req)
        now = time.perf_counter()
        seconds = now - t0
        events: list[tuple[Stream, Event]] = []
        new_tokens, ttfts = 0, []
        for req in stepped:
            stream = self._streams.get(req)
            if stream is None:
                continue
            new_ids = req.output_ids[stream.sent_tokens :]
            new_logprobs = req.output_logprobs[stream.sent_tokens :]
            new_tokens += len(new_ids)
            if not stream.got_token:
                stream.got_token = True
                ttfts.append(now - stream.submitted_at)
            stream.sent_tokens = len(req.output_ids)
            ev = Event(text=req.pop_delta(), token_ids=new_ids, completion_tokens=len(req.output_ids),
                       finish_reason=req.finish_reason, logprobs=new_logprobs)
            if req.finished:
                self._close(stream, ev, events)
            else:
                events.append((stream, ev))
        for req, stream in list(self._streams.items()):
            if req.finished:  # dropped by a failed step
                why = req.error or failure or req.finish_reason
                self._close(stream, Event(error=f"generation failed: {why}", status=500,
                                          finish_reason=req.finish_reason), events)
        started = [s for s in self._waiting if s.request is not None and s.request.state is not RequestState.WAITING]
        for stream in started:
            self._unqueue(stream)
        self.metrics.step(seconds, new_tokens, ttfts)
        self._report()  # before the events go out: a client that saw its token sees /metrics after this step
        self._emit(events)

    def _unqueue(self, stream: Stream) -> None:
        if stream.queued:
            stream.queued = False
            if stream in self._waiting:
                self._waiting.remove(stream)
            with self._lock:
                self._queued -= 1

    def _report(self) -> None:
        kv = self.engine.kv
        self.metrics.set_gauges(EngineGauges(queue_length=self.queue_length(), running=len(self.engine.running),
                                             kv_pages_total=kv.total_pages, kv_pages_free=kv.available_pages()))

    def _shutdown(self) -> None:
        """Cancel everything still open (engine requests and unprocessed submissions) with an error event."""
        message = "the server is shutting down" if self.failure is None else f"the engine loop failed: {self.failure}"
        with self._lock:
            self._closed = True  # no submission can slip in after the inbox is drained below
        events: list[tuple[Stream, Event]] = []
        for req, stream in list(self._streams.items()):
            try:
                self.engine.cancel(req)
            except Exception:  # noqa: BLE001 - best effort while stopping
                log.exception("cancel during shutdown failed")
            self._close(stream, Event(error=message, status=503), events)
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                break
            if cmd is not _STOP and cmd[0] == "add" and not cmd[1].done:
                self._unqueue(cmd[1])
                self._mark_done(cmd[1])
                events.append((cmd[1], Event(error=message, status=503)))
        self._emit(events)
        try:
            self._report()
        except Exception:  # noqa: BLE001
            pass

    @staticmethod
    def _emit(events: list[tuple[Stream, Event]]) -> None:
        """Hand events to their event loops: one call_soon_threadsafe per loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Stream, Event]]] = collections.defaultdict(list)
        for stream, ev in events:
            by_loop[stream.loop].append((stream, ev))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass


def _deliver(items: list[tuple[Stream, Event]]) -> None:
    for stream, ev in items:
        stream.queue.put_nowait(ev)
