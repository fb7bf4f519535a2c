"""Connecting to Ray: join a cluster when there is one, else start a local Ray bound to loopback.

Under `ray job submit` (or with RAY_ADDRESS / --address) the driver joins that cluster. Standalone, the
CLI starts a private local Ray that lives as long as the command (no dashboard). Ray resolves even an
explicit 127.0.0.1 node address to the machine's reachable IP and its GCS/raylet ports listen on all
interfaces, so the protection for a standalone run is Ray's token authentication, which is left exactly
as Ray configures it (never disabled here); what raylstm itself listens on (Serve) binds 127.0.0.1.
"""

from __future__ import annotations

import os
from typing import Any

import ray


def ensure_ray(address: str | None = None, num_cpus: float | None = None, **kwargs: Any) -> dict[str, Any]:
    """ray.init() once: join `address`/RAY_ADDRESS if given, else start a fresh local Ray.

    Returns the cluster's resources. Calling it again in the same process is a no-op.
    """
    if ray.is_initialized():
        return ray.cluster_resources()
    address = address or os.environ.get("RAY_ADDRESS")
    opts: dict[str, Any] = dict(logging_level="WARNING", log_to_driver=True)
    opts.update(kwargs)
    if address:
        ray.init(address=address, **opts)
    else:
        opts.setdefault("include_dashboard", False)
        ray.init(address="local", num_cpus=num_cpus, **opts)
    return ray.cluster_resources()
