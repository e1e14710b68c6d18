"""`vptq-mlc serve --replicas/--ray-address`: checks the cluster extra is installed, then runs `serve_cluster`.

Separate from cluster.py so that a missing Ray gives a one-line install hint instead of an ImportError.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vptq_mlc.errors import RuntimeLoadError

if TYPE_CHECKING:
    from vptq_mlc.runtime.device import DeviceSpec


def serve_replicas(replicas: int | None, device: DeviceSpec | None, **options: Any) -> None:
    """Blocking: the Ray Serve deployment until Ctrl-C / SIGTERM. `device` as the CLI parsed it (None = auto);
    `options` are `ClusterOptions` fields."""
    try:
        from vptq_mlc.serve.cluster import ClusterOptions, serve_cluster
    except ImportError as e:
        raise RuntimeLoadError(f"--replicas/--ray-address need the cluster extra ({e.name} is not installed): "
                               "pip install 'vptq-mlc[cluster]'") from e
    if device is None:  # auto: Ray needs to know whether replicas ask for a GPU
        from vptq_mlc.runtime.device import resolve_device

        device = resolve_device(None)[0]
    if replicas is None:  # autoscaling bounds only: start at the lower bound
        replicas = max(1, options.get("min_replicas") or 1)
    opts = ClusterOptions(device=device, replicas=replicas, **options)
    opts.validate()
    serve_cluster(opts)
