"""Start the server: load the engine once, wrap it in the engine loop and the app, run uvicorn.

`serve()` is what `vptq-mlc serve` runs (blocking). `ServerThread` runs the same app in a background thread
of this process on 127.0.0.1 and an OS-chosen free port: the tests and bench/serve_load.py use it.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from types import TracebackType

import uvicorn

from vptq_mlc.artifact.chat_config import ChatConfig
from vptq_mlc.errors import RuntimeLoadError
from vptq_mlc.runtime.engine import Engine
from vptq_mlc.serve.app import create_app
from vptq_mlc.serve.security import DEFAULT_MAX_BODY_BYTES, secure
from vptq_mlc.serve.worker import EngineWorker

log = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE = 256


def load_engine(model_dir: str | Path, lib: str | Path | None = None, device: str = "auto",
                max_batch_size: int | None = None, context_window: int | None = None,
                max_total_tokens: int | None = None, devices: str | None = None, prefix_cache: bool = False) -> Engine:
    """An Engine sized for serving: by default as many concurrent sequences as the model was converted for.
    `devices` ("cuda:0,cuda:1") splits the layers over several devices."""
    if max_batch_size is None:
        max_batch_size = ChatConfig.load(model_dir).model_config.get("max_batch_size")
    return Engine(model_dir, lib, device=device, max_batch_size=max_batch_size, context_window=context_window,
                  max_total_tokens=max_total_tokens, devices=devices, prefix_cache=prefix_cache)


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, max_queue: int = DEFAULT_MAX_QUEUE,
          model_name: str | None = None, log_level: str = "info", api_key: str | None = None,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
    """Serve `engine` until interrupted (Ctrl-C). With `api_key`, /v1 routes need `Authorization: Bearer <key>`."""
    app = secure(create_app(EngineWorker(engine, max_queue), model_name or engine.model_dir.name), api_key,
                 max_body_bytes, engine.context_window)
    log.info("serving %s on http://%s:%d/v1", model_name or engine.model_dir.name, host, port)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


class ServerThread:
    """`with ServerThread(engine) as s: ... s.url ...`: the server in a background thread on a free port."""

    def __init__(self, engine: Engine, max_queue: int = DEFAULT_MAX_QUEUE, model_name: str | None = None,
                 host: str = "127.0.0.1", start_timeout: float = 30.0, api_key: str | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.model_name = model_name or engine.model_dir.name
        self.worker = EngineWorker(engine, max_queue)
        app = secure(create_app(self.worker, self.model_name), api_key, max_body_bytes, engine.context_window)
        config = uvicorn.Config(app, host=host, port=0, log_level="warning",
                                lifespan="on", timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
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
