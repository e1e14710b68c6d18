"""Start the server: load the engine once, wrap it in the engine loop and the app, run uvicorn.

`serve()` is what `vptq-mlc serve` runs (blocking). `ServerThread` runs the same app in a background thread
of this process on 127.0.0.1 and an OS-chosen free port: the tests and bench/serve_load.py use it.

Connections are bounded in time and size: a request's headers and body must arrive within `read_timeout` seconds
of its first byte (slow clients cannot hold connections), headers are capped at `MAX_HEADER_BYTES`, idle
keep-alive connections close after `KEEP_ALIVE_S`. SIGTERM/SIGINT drain: new requests get 503, running ones get up
to `drain_timeout` seconds to finish, then end with an error chunk and `[DONE]`; a second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from vptq_mlc.artifact.chat_config import ChatConfig
from vptq_mlc.errors import RuntimeLoadError
from vptq_mlc.runtime.device import DeviceLike, Placement
from vptq_mlc.runtime.engine import Engine
from vptq_mlc.serve.app import create_app
from vptq_mlc.serve.security import DEFAULT_MAX_BODY_BYTES, secure
from vptq_mlc.serve.worker import EngineWorker

log = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE = 256
DEFAULT_READ_TIMEOUT_S = 30.0
DEFAULT_DRAIN_TIMEOUT_S = 30.0
MAX_HEADER_BYTES = 64 * 1024
KEEP_ALIVE_S = 5
FINAL_FLUSH_S = 5  # after the drain: time for the last chunks to reach the clients before connections are cut


def load_engine(model_dir: str | Path, lib: str | Path | None = None, device: DeviceLike | Placement = "auto",
                max_batch_size: int | None = None, context_window: int | None = None,
                max_total_tokens: int | None = None, devices: str | None = None, prefix_cache: bool = False,
                step_token_budget: int | None = None, overlap: bool | None = None) -> Engine:
    """An Engine sized for serving: by default as many concurrent sequences as the model was converted for.
    `device` as the CLI parsed it (a Placement, which may split the layers over several devices), or as Engine
    takes it (`devices`: "cuda:0,cuda:1")."""
    if max_batch_size is None:
        max_batch_size = ChatConfig.load(model_dir).model_config.get("max_batch_size")
    return Engine(model_dir, lib, device=device, max_batch_size=max_batch_size, context_window=context_window,
                  max_total_tokens=max_total_tokens, devices=devices, prefix_cache=prefix_cache,
                  step_token_budget=step_token_budget, overlap=overlap)


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, max_queue: int = DEFAULT_MAX_QUEUE,
          model_name: str | None = None, log_level: str = "info", api_key: str | None = None,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, read_timeout: float = DEFAULT_READ_TIMEOUT_S,
          drain_timeout: float = DEFAULT_DRAIN_TIMEOUT_S, max_connections: int | None = None) -> None:
    """Serve `engine` until SIGTERM/Ctrl-C, then drain. With `api_key`, /v1 routes need `Authorization: Bearer KEY`."""
    worker = EngineWorker(engine, max_queue)
    app = secure(create_app(worker, model_name or engine.model_dir.name), api_key, max_body_bytes,
                 engine.context_window)
    log.info("serving %s on http://%s:%d/v1", model_name or engine.model_dir.name, host, port)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, **connection_limits(read_timeout,
                                                                                               max_connections))
    DrainingServer(config, worker, drain_timeout).run()


def connection_limits(read_timeout: float, max_connections: int | None = None) -> dict[str, Any]:
    """uvicorn settings that keep slow or idle clients from holding connections."""
    return {"http": _deadline_protocol(read_timeout), "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
            "timeout_keep_alive": KEEP_ALIVE_S, "limit_concurrency": max_connections,
            "timeout_graceful_shutdown": FINAL_FLUSH_S}


class _ReadDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline: a request (headers and body) must arrive within `read_timeout`
    seconds of the connection opening or of its first byte. uvicorn bounds only idle keep-alive time."""

    read_timeout = DEFAULT_READ_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
            self._arm()  # from the first byte of the request on; not reset by later bytes
        else:
            self._disarm()  # the whole request is here: answering may take as long as generation takes

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE:
            self._disarm()  # idle between requests: uvicorn's keep-alive timeout applies

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.read_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            return
        log.info("closing a connection whose request did not arrive within %g s", self.read_timeout)
        if self.cycle is None or self.cycle.response_complete:  # headers incomplete: nobody answers yet
            msg = f"the request did not arrive within {self.read_timeout:g} s\n".encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\nconnection: close\r\n"
                                 b"content-length: " + str(len(msg)).encode() + b"\r\n\r\n" + msg)
        self.transport.close()  # a body still arriving: the app sees a disconnect


def _deadline_protocol(read_timeout: float) -> type[H11Protocol]:
    if read_timeout <= 0:
        raise ValueError(f"read_timeout must be > 0, got {read_timeout}")
    return type("ReadDeadlineProtocol", (_ReadDeadlineProtocol,), {"read_timeout": read_timeout})


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain on the first SIGTERM/SIGINT (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, worker: EngineWorker, drain_timeout: float) -> None:
        super().__init__(config)
        self.worker, self.drain_timeout = worker, drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Future[None] | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.worker.draining or self._loop is None:
            if sig == signal.SIGINT and self.should_exit:
                self.force_exit = True
            self.should_exit = True  # second signal (or no drain): uvicorn's own shutdown now
            return
        # not re-raised after the drain (uvicorn's default would): the drained exit is a clean one (status 0)
        self._loop.call_soon_threadsafe(self.drain)

    def drain(self) -> None:
        """Start the drain (from the event loop's thread)."""
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        self.worker.begin_drain()
        open_ = self.worker.open_requests()
        log.warning("shutting down: refusing new requests; %d running may finish within %g s (--drain-timeout)",
                    open_, self.drain_timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_timeout
        while self.worker.open_requests() and loop.time() < deadline and not self.should_exit:
            await asyncio.sleep(0.05)
        if left := self.worker.open_requests():
            log.warning("drain timeout: ending %d unfinished requests", left)
            self.worker.abort_all(f"the server shut down before this request finished (--drain-timeout "
                                  f"{self.drain_timeout:g} s); retry it")
            while self.worker.open_requests() and loop.time() < deadline + FINAL_FLUSH_S:
                await asyncio.sleep(0.05)
        self.should_exit = True


class ServerThread:
    """`with ServerThread(engine) as s: ... s.url ...`: the server in a background thread on a free port."""

    def __init__(self, engine: Engine, max_queue: int = DEFAULT_MAX_QUEUE, model_name: str | None = None,
                 host: str = "127.0.0.1", start_timeout: float = 30.0, api_key: str | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, read_timeout: float = DEFAULT_READ_TIMEOUT_S,
                 max_connections: int | None = None) -> None:
        self.model_name = model_name or engine.model_dir.name
        self.worker = EngineWorker(engine, max_queue)
        app = secure(create_app(self.worker, self.model_name), api_key, max_body_bytes, engine.context_window)
        config = uvicorn.Config(app, host=host, port=0, log_level="warning", lifespan="on",
                                **{**connection_limits(read_timeout, max_connections), "timeout_graceful_shutdown": 2})
        self._server = DrainingServer(config, self.worker, 0)
        self._thread = threading.Thread(target=self._server.run, name="vptq-mlc-http", daemon=True)
        self._host, self._start_timeout = host, start_timeout
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeLoadError(f"the HTTP server did not start on {self._host}; check that it can bind there")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
