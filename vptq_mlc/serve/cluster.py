"""`vptq-mlc serve --replicas N`: N engine replicas as a Ray Serve deployment behind the same OpenAI routes.

Two deployments in one Ray Serve application:

- `EngineReplica` (N replicas, or autoscaled between --min-replicas and --max-replicas): one `Engine` + its
  `EngineWorker` loop each, one GPU each through `ray_actor_options` when the device is CUDA, else CPU. Its
  `generate` method streams the worker's `Event`s (as dicts, tagged with the replica id and pid).
- `Ingress` (1 replica, no GPU, no model library): the unchanged FastAPI app of `serve.app.create_app` over a
  `RemoteWorker`, which has `EngineWorker`'s interface (`submit`/`cancel`/`alive`/`metrics`/`frontend`, the
  model's `RequestFrontend`: requests are templated, tokenized and validated here, once) but sends each request
  to a replica through a Ray Serve handle (power-of-two-choices routing on queue length).

Why a separate ingress instead of putting the app on each replica: when a replica dies, Ray's HTTP proxy answers
its in-flight requests with a bare 500; here the ingress sees the replica's death on the handle and (a) sends a
request that had produced no token yet to another replica, so nothing that had not started streaming is lost,
or (b) ends a request that had produced tokens with a 503 "retry" error (an SSE error chunk when streaming).
Every wait on a replica has an inactivity timeout, so nothing hangs. Ray replaces dead replicas itself.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import serve

from vptq_mlc.artifact.chat_config import ChatConfig
from vptq_mlc.errors import RuntimeLoadError
from vptq_mlc.runtime.device import DeviceSpec
from vptq_mlc.runtime.frontend import RequestFrontend
from vptq_mlc.runtime.sampling import SamplingParams
from vptq_mlc.serve.metrics import PREFIX, ServeMetrics
from vptq_mlc.serve.security import DEFAULT_MAX_BODY_BYTES, secure
from vptq_mlc.serve.worker import EngineWorker, Event, QueueFullError, WorkerStoppedError

log = logging.getLogger(__name__)

APP_NAME = "vptq-mlc"
ENGINE_DEPLOYMENT = "EngineReplica"
RAY_OBJECT_STORE_BYTES = 200 * 1024 * 1024  # events are tiny; Ray's default (30% of RAM) is far too much


@dataclass
class ClusterOptions:
    """Everything `vptq-mlc serve --replicas` needs (the single-process server's options plus Ray's)."""

    model_dir: str
    lib: str | None = None
    device: DeviceSpec = DeviceSpec("cpu")  # resolved (no auto): it decides whether replicas ask Ray for a GPU
    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    ray_address: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int | None = None
    max_queue: int = 256
    max_total_tokens: int | None = None
    context_window: int | None = None
    step_token_budget: int | None = None  # tokens of a step mixing decode tokens and prompt chunks (Engine's)
    overlap: bool | None = None  # the Engine's overlapped decoding (None: on where the device allows it)
    model_name: str | None = None
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    request_timeout: float = 120.0  # seconds without any event from a replica before a request fails with 503
    retries: int = 3  # replicas tried for a request that has produced no token yet
    engine_env: dict[str, str] = field(default_factory=dict)  # extra env vars for replica processes

    def validate(self) -> None:
        lo, hi = self.min_replicas, self.max_replicas
        if self.replicas < 1 or (lo is not None and lo < 0) or (hi is not None and hi < 1):
            raise RuntimeLoadError("--replicas and --max-replicas must be >= 1 and --min-replicas >= 0")
        if (lo is not None or hi is not None) and not (lo or 0) <= self.replicas <= (hi or self.replicas):
            raise RuntimeLoadError(f"--replicas {self.replicas} must lie within --min-replicas {lo} and "
                                   f"--max-replicas {hi}")
        if self.max_queue < 1:
            raise RuntimeLoadError("--max-queue must be >= 1")

    @property
    def gpu(self) -> bool:
        return self.device.kind == "cuda"


# ---- replica side --------------------------------------------------------------------------------------------


class EngineReplica:
    """One engine and its loop in one Ray actor; `generate` streams a request's events."""

    def __init__(self, opts: ClusterOptions) -> None:
        from vptq_mlc.serve.server import load_engine

        device = DeviceSpec("cuda", 0) if opts.gpu else opts.device  # Ray sets CUDA_VISIBLE_DEVICES to its GPU
        self.engine = load_engine(opts.model_dir, opts.lib, device=device, max_batch_size=opts.max_batch_size,
                                  context_window=opts.context_window, max_total_tokens=opts.max_total_tokens,
                                  step_token_budget=opts.step_token_budget, overlap=opts.overlap)
        self.worker = EngineWorker(self.engine, opts.max_queue)
        self.worker.start()
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.pid = os.getpid()
        log.info("replica %s (pid %d) ready", self.replica, self.pid)

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Any:
        """The worker's events for one request, as dicts with `replica` and `pid` added. `params` arrives as the
        ingress validated it (unpickled, not rebuilt)."""
        tag = {"replica": self.replica, "pid": self.pid}
        try:
            stream = self.worker.submit(prompt_ids, params)
        except (QueueFullError, WorkerStoppedError) as e:
            yield {**dataclasses.asdict(Event(error=str(e), status=503)), **tag}
            return
        try:
            while True:
                ev = await stream.next()
                yield {**dataclasses.asdict(ev), **tag}
                if ev.error is not None or ev.finish_reason is not None:
                    return
        finally:  # the ingress cancelled (client gone) or the request ended
            if not stream.done:
                self.worker.cancel(stream)

    def info(self) -> dict[str, Any]:
        return {"replica": self.replica, "pid": self.pid, "context_window": self.engine.context_window}

    def check_health(self) -> None:
        """Ray Serve calls this periodically; raising makes Ray replace the replica."""
        if not self.worker.alive():
            raise RuntimeError(f"the engine loop is not running: {self.worker.failure}")

    def __del__(self) -> None:
        """Graceful shutdown (Ray Serve calls this after draining): open requests get a 503 'shutting down'."""
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.stop(timeout=10)


# ---- ingress side --------------------------------------------------------------------------------------------


class RemoteStream:
    """`worker.Stream`'s interface for app.py: events arrive on `queue`; `done` once the last one is queued."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.done = False
        self.task: asyncio.Task[None] | None = None

    async def next(self) -> Event:
        return await self.queue.get()

    def put(self, ev: Event) -> None:
        if ev.error is not None or ev.finish_reason is not None:
            self.done = True
        self.queue.put_nowait(ev)


class ClusterMetrics(ServeMetrics):
    """The ingress's view: HTTP counters and requests (as the single server), plus requests per replica."""

    def __init__(self) -> None:
        super().__init__()
        self.per_replica: collections.Counter[tuple[str, int]] = collections.Counter()
        self.failovers = 0
        self.replica_failures = 0

    def render(self) -> str:
        with self._lock:
            rows = sorted(self.per_replica.items())
            failovers, failures = self.failovers, self.replica_failures
        lines = [f"# HELP {PREFIX}_replica_requests_total Requests accepted by each engine replica (Ray Serve).",
                 f"# TYPE {PREFIX}_replica_requests_total counter"]
        lines += [f'{PREFIX}_replica_requests_total{{replica="{r}",pid="{p}"}} {n}' for (r, p), n in rows]
        lines += [f"# HELP {PREFIX}_replica_failovers_total Requests sent to another replica after theirs failed "
                  "before producing a token.", f"# TYPE {PREFIX}_replica_failovers_total counter",
                  f"{PREFIX}_replica_failovers_total {failovers}",
                  f"# HELP {PREFIX}_replica_failures_total Requests ended with a 503 because their replica failed "
                  "after producing tokens.", f"# TYPE {PREFIX}_replica_failures_total counter",
                  f"{PREFIX}_replica_failures_total {failures}"]
        return super().render() + "\n".join(lines) + "\n"


class RemoteWorker:
    """`EngineWorker`'s interface over the replicas (used by app.py unchanged)."""

    draining = False  # Ray Serve drains its replicas itself
    engine = None  # the engines live in the replicas

    def __init__(self, handle: Any, frontend: RequestFrontend, timeout: float, retries: int) -> None:
        self.frontend = frontend
        self.metrics = ClusterMetrics()
        self.failure: BaseException | None = None
        self._handle = handle.options(stream=True)
        self._info = handle.info
        self._timeout, self._retries = timeout, retries
        self._tasks: set[asyncio.Task[None]] = set()
        self._healthy_at = 0.0
        self._probe: asyncio.Task[None] | None = None
        self._stopped = False

    def start(self) -> None:
        self._probe = asyncio.get_running_loop().create_task(self._watch())

    def stop(self) -> None:
        self._stopped = True
        for task in [*self._tasks, *([self._probe] if self._probe else [])]:
            task.get_loop().call_soon_threadsafe(task.cancel)

    def alive(self) -> bool:
        """Healthy while some replica answered within the last 10 s."""
        return not self._stopped and time.monotonic() - self._healthy_at < 10.0

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RemoteStream:
        if self._stopped:
            raise WorkerStoppedError("the server is shutting down; retry on another server")
        stream = RemoteStream()
        stream.task = asyncio.get_running_loop().create_task(self._pump(stream, prompt_ids, params))
        self._tasks.add(stream.task)
        stream.task.add_done_callback(self._tasks.discard)
        return stream

    def cancel(self, stream: RemoteStream) -> None:
        if stream.task is not None and not stream.task.done():
            stream.task.cancel()

    async def _watch(self) -> None:
        """Probe a replica every 2 s (for /health)."""
        while True:
            try:
                await asyncio.wait_for(self._info.remote(), timeout=5.0)
                self._healthy_at = time.monotonic()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure just means "not healthy now"
                log.warning("replica health probe failed: %s", e)
            await asyncio.sleep(2.0)

    async def _pump(self, stream: RemoteStream, prompt_ids: list[int], params: SamplingParams) -> None:
        """Forward one request's events from a replica; fail over while it has produced no token."""
        accepted = produced = False
        attempt = 0
        while True:
            gen = self._handle.generate.remote(prompt_ids, params)
            try:
                it = gen.__aiter__()
                while True:
                    try:
                        raw = await asyncio.wait_for(it.__anext__(), timeout=self._timeout)
                    except StopAsyncIteration:
                        raise ConnectionError("the replica closed the request's stream early") from None
                    except asyncio.TimeoutError:
                        raise TimeoutError(f"no progress from the replica for {self._timeout:g} s") from None
                    replica, pid = raw.pop("replica"), raw.pop("pid")
                    ev = Event(**raw)
                    if ev.prompt_tokens is not None:
                        with self.metrics._lock:  # noqa: SLF001 - our own subclass's lock
                            self.metrics.per_replica[(replica, pid)] += 1
                        if accepted:
                            continue  # a failed-over request was already accepted once
                        accepted = True
                        self.metrics.request_started(ev.prompt_tokens)
                    produced = produced or bool(ev.token_ids or ev.text)
                    if ev.error is None and ev.finish_reason is None:
                        stream.put(ev)
                        continue
                    if ev.error is not None and ev.status == 503 and not produced and attempt < self._retries:
                        raise ConnectionError(ev.error)  # that replica's queue is full or it is stopping
                    self.metrics.request_finished(ev.finish_reason or "error")
                    stream.put(ev)
                    return
            except asyncio.CancelledError:
                gen.cancel()
                if not stream.done:
                    self.metrics.request_finished("cancelled")
                raise
            except Exception as e:  # noqa: BLE001 - replica died, was unreachable, timed out or refused
                gen.cancel()
                if not produced and attempt < self._retries:
                    attempt += 1
                    with self.metrics._lock:  # noqa: SLF001
                        self.metrics.failovers += 1
                    log.warning("replica failed before the first token (%s: %s); retrying (%d/%d)",
                                type(e).__name__, e, attempt, self._retries)
                    await asyncio.sleep(0.2 * attempt)
                    continue
                with self.metrics._lock:  # noqa: SLF001
                    self.metrics.replica_failures += 1
                self.metrics.request_finished("error")
                stream.put(Event(error=f"the engine replica serving this request failed ({type(e).__name__}); "
                                       "retry the request", status=503))
                return


@serve.ingress()
class Ingress:
    """The HTTP entry point: app.py's routes over a `RemoteWorker`, guarded by `security.secure`."""

    def __init__(self, engine: Any, opts: ClusterOptions, context_window: int) -> None:
        self._handle, self._opts, self._context_window = engine, opts, context_window

    def __serve_build_asgi_app__(self) -> Any:
        from vptq_mlc.serve.app import create_app

        opts = self._opts
        frontend = RequestFrontend(opts.model_dir, context_window=self._context_window)
        worker = RemoteWorker(self._handle, frontend, opts.request_timeout, opts.retries)
        name = opts.model_name or Path(opts.model_dir).name
        return secure(create_app(worker, name), opts.api_key, opts.max_body_bytes, self._context_window)


def build_application(opts: ClusterOptions) -> Any:
    """The Ray Serve application (ingress bound to the engine deployment) for `opts`."""
    opts.validate()
    context_window = opts.context_window or ChatConfig.load(opts.model_dir).context_window_size
    scaling: dict[str, Any]
    if opts.min_replicas is not None or opts.max_replicas is not None:
        hi = opts.max_replicas or max(opts.replicas, opts.min_replicas or 1)
        scaling = {"autoscaling_config": {"min_replicas": opts.min_replicas if opts.min_replicas is not None else 1,
                                          "max_replicas": hi, "initial_replicas": opts.replicas,
                                          "target_ongoing_requests": max(1, opts.max_batch_size or 16)}}
    else:
        scaling = {"num_replicas": opts.replicas}
    actor: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1} if opts.gpu else {"num_cpus": 1}
    if opts.engine_env:
        actor["runtime_env"] = {"env_vars": dict(opts.engine_env)}
    engine = serve.deployment(
        EngineReplica, name=ENGINE_DEPLOYMENT, ray_actor_options=actor,
        max_ongoing_requests=opts.max_queue + (opts.max_batch_size or 256),  # the worker's own queue bounds it
        max_queued_requests=opts.max_queue,  # past this the handle raises BackPressureError: the ingress's 503
        graceful_shutdown_timeout_s=15, health_check_period_s=5, health_check_timeout_s=30, **scaling,
    ).bind(opts)
    ingress = serve.deployment(Ingress, name="Ingress", num_replicas=1, ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=100_000, graceful_shutdown_timeout_s=20)
    return ingress.bind(engine, opts, context_window)


def start_ray(opts: ClusterOptions) -> None:
    """Join `--ray-address`, or start a small local Ray on loopback (no dashboard, 200 MB object store)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    if opts.ray_address:
        ray.init(address=opts.ray_address, logging_level=logging.WARNING)
        return
    slots = max(opts.replicas, opts.max_replicas or 0)
    ray.init(address="local", include_dashboard=False, num_cpus=slots + 1,
             num_gpus=slots if opts.gpu else 0, object_store_memory=RAY_OBJECT_STORE_BYTES,
             _node_ip_address="127.0.0.1", logging_level=logging.WARNING)


def start_cluster(opts: ClusterOptions, timeout: float = 600.0) -> str:
    """Start Ray (if needed), the HTTP proxy on opts.host:opts.port and the application; returns the base URL."""
    start_ray(opts)
    serve.start(http_options={"host": opts.host, "port": opts.port}, proxy_location="HeadOnly")
    serve.run(build_application(opts), name=APP_NAME, route_prefix="/", blocking=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # serve.run returns once deployed; wait until a replica answers
        status = serve.status().applications.get(APP_NAME)
        if status is not None and str(status.status).endswith("RUNNING"):
            return f"http://{opts.host}:{opts.port}"
        if status is not None and str(status.status).endswith("DEPLOY_FAILED"):
            raise RuntimeLoadError(f"the Ray Serve deployment failed: {status.message}")
        time.sleep(0.5)
    raise RuntimeLoadError(f"the replicas did not start within {timeout:g} s; see Ray's logs")


def stop_cluster(shutdown_ray: bool = True) -> None:
    """Graceful: Serve drains the replicas (open requests end with 503 'shutting down'), then Ray stops."""
    import ray

    try:
        serve.shutdown()
    finally:
        if shutdown_ray and ray.is_initialized():
            ray.shutdown()


def serve_cluster(opts: ClusterOptions) -> None:
    """What `vptq-mlc serve --replicas N` runs: start, then wait for Ctrl-C / SIGTERM, then stop gracefully."""
    stop = threading.Event()
    start_ray(opts)
    # after ray.init (it installs handlers of its own) but before the HTTP proxy answers: a signal that arrives
    # while the replicas come up must still mean "stop gracefully", not Ray's default exit
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    url = start_cluster(opts)
    log.warning("serving %s with %d replica(s) on %s/v1 (Ray Serve)", opts.model_name or Path(opts.model_dir).name,
                opts.replicas, url)
    try:
        stop.wait()
    finally:
        stop_cluster(shutdown_ray=not opts.ray_address)
