"""The Ray Serve deployment: one replica = one Sampler + its engine + the HTTP routes. The engine runs in a
child process of the replica (engine_process.ProcessEngine, serve.engine_process = true, the default) or
in a step thread inside it (engine.Engine).

    client --HTTP--> Serve proxy --(max_queued_requests: 429 past it)--> LSTMServer replica
        __init__                   load the checkpoint, start the engine; Serve sends this replica no
                                   request before it returns (health: not ready while loading)
        __serve_build_asgi_app__   routes.build_api(self, token hash): FastAPI app, per replica
        reconfigure(user_config)   hot reload: {"checkpoint": PATH or null (the source's best)}; Serve
                                   calls it on every replica, and on any replica started later
        check_health               Serve restarts a replica whose engine (process or thread) died
        graceful shutdown          Serve stops routing to a stopping replica and waits drain_timeout_s
                                   for its in-flight requests (they finish on the engine as usual)

A replica following a run dir also polls best.json and switches when it names a new checkpoint.
`build_app` / `app_builder` (serve_config.yaml) / `start_server` (tests, the demo) / `run_server`
(`raylstm serve`) make and run the application.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.config import BackpressureConfig

from raylstm import storage as store
from raylstm.checkpoint import BEST, META, CheckpointError, resolve_checkpoint
from raylstm.config import ServeConfig, load_config
from raylstm.engine import Engine, ServingEngine, Stream
from raylstm.engine_process import ProcessEngine
from raylstm.metrics import ServeMetrics
from raylstm.ray_env import serve_http_address
from raylstm.routes import build_api, token_sha256
from raylstm.sample import SampleParams, Sampler

log = logging.getLogger("ray.serve")

# Requests a replica takes beyond its batch and queue: /healthz, /metrics and /v1/model must still get
# through while the engine is full (the engine's own queue bound answers 429 first).
HEADROOM_REQUESTS = 32


@serve.deployment
@serve.ingress()
class LSTMServer:
    # Engine keyword options (engine.Engine, or engine_process.ProcessEngine with "process": True, which
    # overrides ServeConfig.engine_process); bench_serve's and ab_serve's variants set them to compare designs.
    engine_options: dict[str, Any] = {}

    async def __init__(
        self,
        source: str,
        serve_config: dict,
        token_hash: str | None,
        follow: bool,
        checkpoint: str | None = None,
    ) -> None:
        import torch

        self.cfg = cfg = ServeConfig(**serve_config)
        # Small-batch LSTM steps gain nothing from a thread pool, and on a busy host it spins.
        torch.set_num_threads(max(1, int(cfg.num_cpus)))
        self.device = "cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        if store.is_remote(source):
            # On object storage: each replica copies the best (or given) checkpoint into its own node's
            # cache and serves that verified copy; following best.json in a bucket is not supported.
            source, follow = str(store.localize_checkpoint(source)), False
        self.source, self.follow, self.token_hash = source, follow, token_hash
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.created = int(time.time())
        self.metrics = ServeMetrics(self.replica)
        # The checkpoint pinned when the app was built (user_config says the same), else the source's best.
        sampler = Sampler.load(_local(checkpoint) if checkpoint else source, self.device)
        options = dict(self.engine_options)
        in_process = not options.pop("process", cfg.engine_process)
        if not in_process:
            options.setdefault("device", self.device)
            options.setdefault("torch_threads", max(1, int(cfg.num_cpus)))
        self.engine: ServingEngine = (Engine if in_process else ProcessEngine)(
            sampler,
            cfg.max_batch_size,
            cfg.max_queued,
            cfg.request_timeout_s,
            cfg.retry_after_s,
            self.metrics,
            **options,
        )
        # A ProcessEngine returns once its process has loaded the model: until then Serve sends nothing.
        self.engine.start()
        self.metrics.serving(sampler.step_number, sampler.info()["val_bpc"])
        self.reloads = 0
        self.loading: str | None = None  # a checkpoint being loaded beside the served one
        self._pinned = checkpoint  # user_config's checkpoint; None: the source's best (and follow it)
        self._last_best = sampler.path.resolve() if sampler.path else None
        self._switching = asyncio.Lock()
        self._poller = asyncio.create_task(self._poll_best()) if follow and cfg.reload_poll_s > 0 else None

    def __serve_build_asgi_app__(self):
        return build_api(self, self.token_hash)

    # --- Serve's hooks ----------------------------------------------------------------------------------
    async def reconfigure(self, user_config: dict) -> None:
        """Serve's user_config: {"checkpoint": PATH} pins a checkpoint, null goes back to the source's best."""
        self._pinned = (user_config or {}).get("checkpoint")
        await self._switch(self._pinned or self.source)

    def check_health(self) -> None:
        if not self.engine.alive:
            raise RuntimeError("raylstm: the engine (its step thread or its process) is not running")

    def __del__(self) -> None:
        # Serve has drained this replica (graceful shutdown) by the time it is deleted.
        if getattr(self, "_poller", None) is not None:
            self._poller.cancel()
        if getattr(self, "engine", None) is not None:
            self.engine.stop(timeout_s=5)

    # --- what the routes call ---------------------------------------------------------------------------
    async def submit(
        self, prompts: list[str | list[int]], params: SampleParams, n: int, best_of: int | None, stream: bool
    ) -> Stream:
        """Queue a request on this replica's engine (QueueFull / EngineStopped at once)."""
        return self.engine.submit(prompts, params, n, best_of, stream)

    def model_info(self) -> dict[str, Any]:
        stats = self.engine.stats()
        info = self.engine.sampler.info()
        info.update(
            model_id=self.cfg.model_id,
            source=self.source,
            follow=self.follow,
            pinned=self._pinned,
            reloads=self.reloads,
            replica=self.replica,
            pid=os.getpid(),
            engine_pid=stats["engine_pid"],
            active_rows=stats["active_rows"],
            waiting=stats["waiting"],
            max_batch_size=self.cfg.max_batch_size,
            max_queued=self.cfg.max_queued,
            mean_rows_per_step=stats["rows_stepped"] / max(1, stats["steps"]),
        )
        return info

    # --- switching checkpoints --------------------------------------------------------------------------
    async def _switch(self, target: str) -> bool:
        """Load `target` beside the current checkpoint, then swap: rows already generating finish on the
        old sampler (the engine keeps each row's sampler), new requests start on the new one."""
        async with self._switching:
            path = resolve_checkpoint(_local(target)).resolve()
            current = self.engine.sampler.path
            if current is not None and path == Path(current).resolve():
                return False
            loop = asyncio.get_running_loop()
            self.loading = str(path)
            try:
                sampler = await loop.run_in_executor(None, Sampler.load, str(path), self.device)
            finally:
                self.loading = None
            await self.engine.reload(sampler)
            self.reloads += 1
            self.metrics.reloads.labels(self.replica).inc()
            self.metrics.serving(sampler.step_number, sampler.info()["val_bpc"])
            log.info("raylstm: now serving %s (step %s)", sampler.path, sampler.step_number)
            return True

    async def _poll_best(self) -> None:
        # Reload when best.json names a new checkpoint (not whenever it differs from what is served, so a
        # pinned checkpoint sticks until the trainer writes a new best).
        while True:
            await asyncio.sleep(self.cfg.reload_poll_s)
            try:
                best = resolve_checkpoint(self.source).resolve()
                if best != self._last_best:
                    self._last_best = best
                    if self._pinned is None:
                        await self._switch(str(best))
            except (CheckpointError, OSError) as e:
                log.warning("raylstm: best.json poll: keeping %s: %s", self.engine.sampler.path, e)


def _pin(checkpoint: str | Path | None) -> str | None:
    """A pinned checkpoint as the replicas will read it: an absolute path, or an object-storage URI."""
    if checkpoint is None:
        return None
    return str(checkpoint) if store.is_remote(str(checkpoint)) else str(Path(checkpoint).resolve())


def _local(target: str) -> str:
    """A checkpoint on object storage is served from this node's verified copy."""
    return str(store.localize_checkpoint(target)) if store.is_remote(target) else target


# --- building and running -------------------------------------------------------------------------------
def build_app(
    source: str | Path,
    cfg: ServeConfig | None = None,
    *,
    follow: bool | None = None,
    token: str | None = None,
    checkpoint: str | Path | None = None,
) -> serve.Application:
    """The Serve application for a checkpoint dir or a run dir (a run dir is followed via best.json).

    `checkpoint` pins another checkpoint (user_config): running the same app again with a different one
    switches every replica without restarting it."""
    cfg = cfg or ServeConfig()
    if store.is_remote(source):
        store.best_checkpoint_uri(str(source))  # fail here, in the driver, with a clear message
        follow = False
    else:
        source = Path(source).resolve()
        resolve_checkpoint(source)  # fail here, in the driver, with a clear message
    if follow is None:
        follow = (source / BEST).exists() and not (source / META).exists()
    if checkpoint is not None and not store.is_remote(str(checkpoint)):
        resolve_checkpoint(checkpoint)  # a pinned checkpoint that does not exist fails here, not in replicas
    opts = deployment_options(cfg, checkpoint)
    token = token if token is not None else os.environ.get(cfg.token_env)
    return LSTMServer.options(**opts).bind(
        str(source), dataclasses.asdict(cfg), token_sha256(token), follow, _pin(checkpoint)
    )


def deployment_options(cfg: ServeConfig, checkpoint: str | Path | None = None) -> dict[str, Any]:
    """LSTMServer's Serve options from the config: resources, bounds, drain, replicas, user_config."""
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        # A replica takes its full batch, its queue and some headroom; past that Serve's proxy queues at
        # most max_queued requests and answers the rest 429 with Retry-After, never an unbounded wait.
        "max_ongoing_requests": cfg.max_batch_size + cfg.max_queued + HEADROOM_REQUESTS,
        "max_queued_requests": cfg.max_queued,
        "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=cfg.retry_after_s),
        "graceful_shutdown_timeout_s": cfg.drain_timeout_s,
        # A redeploy that replaces replicas starts the new ones first: the old ones serve until then,
        # then drain (finish their in-flight requests) and stop.
        "max_surge_percent": 100,
        "user_config": {"checkpoint": _pin(checkpoint)},
    }
    if cfg.max_replicas > cfg.num_replicas:
        opts["autoscaling_config"] = {
            "min_replicas": cfg.num_replicas,
            "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": max(1, cfg.max_batch_size),
        }
    else:
        opts["num_replicas"] = cfg.num_replicas
    return opts


def app_builder(args: dict[str, Any]) -> serve.Application:
    """`serve run/deploy` entry (serve_config.yaml): args {run: DIR} or {checkpoint: DIR}, plus any
    ServeConfig field (e.g. max_batch_size) and optionally `config: path/to/config.toml`."""
    args = dict(args)
    source = args.pop("run", None) or args.pop("checkpoint", None)
    if not source:
        raise ValueError("serve_config.yaml: application args need `run: RUN_DIR` or `checkpoint: CKPT_DIR`")
    cfg_path = args.pop("config", None)
    # Through the config layer, so the YAML's fields get the same checks and errors as --set overrides.
    cfg = load_config(cfg_path, [f"serve.{k}={json.dumps(v)}" for k, v in args.items()]).serve
    return build_app(source, cfg)


@dataclass
class ServerHandle:
    """A running Serve app started by `start_server`: `reload()` switches every replica to another
    checkpoint (Serve's user_config), `shutdown()` stops Serve (replicas drain their requests first)."""

    url: str
    name: str
    source: str
    cfg: ServeConfig
    follow: bool | None = None
    token: str | None = None
    route_prefix: str = "/"

    def reload(self, checkpoint: str | Path | None) -> None:
        """Pin `checkpoint` on every replica (None: back to the source's best); returns once Serve has
        reconfigured them all. Requests already generating finish on the checkpoint they started on."""
        app = build_app(self.source, self.cfg, follow=self.follow, token=self.token, checkpoint=checkpoint)
        serve.run(app, name=self.name, route_prefix=self.route_prefix, blocking=False)

    def shutdown(self) -> None:
        serve.shutdown()


def wait_healthy(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError as e:  # proxy not listening yet, or no replica ready
            last = e
        time.sleep(0.2)
    raise TimeoutError(f"{url}/healthz not answering after {timeout_s:.0f} s ({last})")


def start_server(
    source: str | Path,
    cfg: ServeConfig | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
    name: str = "raylstm",
    follow: bool | None = None,
    token: str | None = None,
) -> ServerHandle:
    """Start Serve on the connected Ray (ray.init first) and run the app; returns once /healthz answers.

    Serve's HTTP host/port are cluster-wide and fixed while Serve runs, so this owns Serve on the cluster:
    call `handle.shutdown()` (serve.shutdown) before starting another on a different port.
    """
    cfg = dataclasses.replace(cfg or ServeConfig())
    cfg.host = host or cfg.host
    cfg.port = port if port is not None else cfg.port
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(source, cfg, follow=follow, token=token), name=name, route_prefix="/", blocking=False)
    cfg.host, cfg.port = serve_http_address(cfg.host, cfg.port)  # an earlier serve.start wins
    url = f"http://{'127.0.0.1' if cfg.host in ('0.0.0.0', '::') else cfg.host}:{cfg.port}"
    wait_healthy(url)
    return ServerHandle(url=url, name=name, source=str(source), cfg=cfg, follow=follow, token=token)


def run_server(
    source: str,
    cfg: ServeConfig,
    *,
    follow: bool,
    address: str | None = None,
) -> int:
    """`raylstm serve`: run the app until Ctrl-C (serve.run(blocking=True)), then shut Serve down."""
    from raylstm.ray_env import ensure_ray

    ensure_ray(address)
    remote = store.is_remote(source)  # s3://...: served from a copy, not followed (see LSTMServer)
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        app = build_app(source, cfg, follow=follow and not remote)
        host, port = serve_http_address(cfg.host, cfg.port)
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        auth = (
            "on" if os.environ.get(cfg.token_env) else f"off (set {cfg.token_env} to require a bearer token)"
        )
        serving = store.best_checkpoint_uri(source) if remote else resolve_checkpoint(source)
        banner = (
            f"raylstm serving {serving}\n  {url}/  (web page)\n  {url}/docs  (OpenAPI)\n  {url}/metrics"
            f"  (Prometheus)\n  auth: {auth}\nstarting (Serve logs when the app is ready); Ctrl-C to stop."
        )
        print(banner, flush=True)
        serve.run(app, name="raylstm", route_prefix="/", blocking=True)  # until Ctrl-C
    except KeyboardInterrupt:
        print("shutting down Serve (in-flight requests finish first)", flush=True)
    finally:
        serve.shutdown()  # also when Ctrl-C comes during startup
    return 0
