"""Connecting to Ray, and every Ray-version workaround raylstm needs, each with its reason.

Under `ray job submit` (or with RAY_ADDRESS / --address) the driver joins that cluster. Standalone, the
CLI starts a private local Ray that lives as long as the command (no dashboard). Ray resolves even an
explicit 127.0.0.1 node address to the machine's reachable IP and its GCS/raylet ports listen on all
interfaces, so the protection for a standalone run is Ray's token authentication, which is left exactly
as Ray configures it (never disabled here); what raylstm itself listens on (Serve) binds 127.0.0.1.

Workarounds (measured on Ray 2.60.0, 2 cores; recheck them when the Ray pin in pyproject.toml moves):

  v1_parquet_reader()       Ray Data's v2 Parquet datasource adds a file-listing stage: 3-7 s per read
                            of a one-file split vs ~0.1 s for v1.
  task_based_shuffle()      the default hash shuffle starts fresh aggregator actors on every run: 6-9 s
                            vs ~2 s (sort-based, pull) for the dedupe of 10k reviews.
  quiet_dataset(ds)         each epoch/evaluation is a new execution that prints its plan and progress
                            bars (100 times in a demo run).
  MIN_REPORT_INTERVAL_S     Train V2's controller takes one report off each worker's size-1 queue per
                            health check (2 s): reporting faster blocks the training loop.
  console_print(msg)        Train's patched print() both tees and logs a worker's line, so every line
                            shows twice on the driver.
  serve_http_address()      Serve's actual HTTP host/port (an earlier serve.start wins) are only on the
                            private global client.
  ray_logs_dir()            the session's log directory (where a quiet run's Ray lines go) is only on
                            the private global node.
  quiet_ray_console()       Ray Data logs every execution's plan and progress to the driver's console
                            at INFO (100+ lines before a demo run trains), and warns once, from an
                            internal module, that the progress bars are off when they are turned off.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray

# Ray Train V2 polls each worker's report queue once per health check (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S).
MIN_REPORT_INTERVAL_S = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0"))


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


@contextmanager
def _data_context(**values: Any) -> Iterator[None]:
    """Set DataContext fields for the reads/plans created inside, then restore them, so other Ray Data
    users in the process are unaffected (the fields are read when a read or plan is created)."""
    from ray.data.context import DataContext

    ctx = DataContext.get_current()
    old = {k: getattr(ctx, k) for k in values}
    for k, v in values.items():
        setattr(ctx, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(ctx, k, v)


def v1_parquet_reader() -> Any:
    """Context manager: Parquet reads created inside use Ray Data's v1 datasource (see module docstring)."""
    return _data_context(use_datasource_v2=False)


def task_based_shuffle() -> Any:
    """Context manager: shuffles/groupbys created inside run as sort-based pull tasks (see module docstring)."""
    from ray.data.context import ShuffleStrategy

    return _data_context(shuffle_strategy=ShuffleStrategy.SORT_SHUFFLE_PULL_BASED)


def quiet_dataset(ds: ray.data.Dataset) -> ray.data.Dataset:
    """No execution-plan print and no progress bars for every execution of `ds` (epochs, evaluations)."""
    ds.context.print_on_execution_start = False
    ds.context.enable_progress_bars = False
    return ds


def console_print(message: str) -> None:
    """One console line from a Train worker, straight to the process's stdout (see module docstring)."""
    print(message, file=sys.__stdout__, flush=True)


def serve_http_address(default_host: str, default_port: int) -> tuple[str, int]:
    """(host, port) Serve really listens on; the defaults when the private client cannot say."""
    try:
        from ray.serve.context import _get_global_client

        http = _get_global_client().http_config
        return http.host, http.port
    except (ImportError, AttributeError):
        return default_host, default_port


def ray_logs_dir() -> str | None:
    """This Ray session's log directory on the driver's node, or None when Ray cannot say."""
    try:
        return ray._private.worker._global_node.get_logs_dir_path()
    except AttributeError:
        return None


def quiet_ray_console() -> None:
    """Keep Ray Data's per-execution output off this process's console: no execution-plan lines, no
    progress bars, and its INFO log lines only in its log file (ray-data.log in the Ray session's logs).
    Warnings and errors still reach the console. For the driver of a run that shows its own progress
    (raylstm.progress; see the module docstring)."""
    import logging

    from ray.data.context import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):  # the console; its file handler keeps everything
            handler.setLevel(logging.WARNING)
    # The module that picks a progress UI warns once that the bars are off, which is the point here; it
    # logs nothing else (Ray 2.60).
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
