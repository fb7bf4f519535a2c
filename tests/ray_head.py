"""A real `ray start --head` for tests, fenced off from every other Ray on the machine.

The head runs in a private PID and mount namespace (`unshare`): its /tmp/ray is a directory of the test's
own, and when the test is done a `ray stop` entered into that namespace (nsenter) can only see the head's
processes. Its ports are free ports picked for it (6379/8265 may belong to someone else's cluster), bound to
127.0.0.1. Token authentication is on, as a user would run it: `ray get-auth-token --generate` writes the
token, `RAY_AUTH_MODE=token ray start --head` uses it, and clients get RAY_AUTH_MODE=token plus
RAY_AUTH_TOKEN_PATH.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from moto_s3 import free_port

VENV_BIN = Path(sys.executable).parent


@dataclass
class Head:
    dashboard: str  # http://127.0.0.1:PORT: `ray job submit --address`, `serve deploy -a`
    gcs: str  # 127.0.0.1:PORT: `ray status --address`
    token_path: Path
    work: Path
    pid: int  # the namespace's init; nsenter target
    client_env: dict[str, str] = field(default_factory=dict)

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        """A Ray CLI command as a client of this head (token auth on), from the repository root."""
        proc = subprocess.run(
            list(args),
            env=self.client_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=Path(__file__).resolve().parents[1],
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{shlex.join(args)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
            )
        return proc

    def log(self) -> str:
        return (self.work / "head.log").read_text(errors="replace")


def _base_env(home: Path, extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["HOME"] = str(home)
    env.update(extra or {})
    return env


def namespaces_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root for a private PID namespace (ray stop must not reach other Ray processes)"
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, text=True
    )
    return None if probe.returncode == 0 else f"unshare failed: {probe.stderr.strip()}"


@contextmanager
def local_head(work: Path, num_cpus: int = 4, env: dict[str, str] | None = None) -> Iterator[Head]:
    """Start a token-authenticated head; `env` (e.g. the S3 endpoint) goes to the head and so to every job."""
    work.mkdir(parents=True, exist_ok=True)
    home = work / "home"
    home.mkdir(exist_ok=True)
    (work / "ray").mkdir(exist_ok=True)
    head_env = _base_env(home, env)
    subprocess.run(["ray", "get-auth-token", "--generate"], env=head_env, check=True, capture_output=True)
    token_path = home / ".ray" / "auth_token"
    gcs, dash, agent, client = free_port(), free_port(), free_port(), free_port()
    start = shlex.join(
        [
            "ray",
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--dashboard-agent-listen-port={agent}",
            f"--ray-client-server-port={client}",
            f"--num-cpus={num_cpus}",
            "--disable-usage-stats",
        ]
    )
    script = (
        "set -e; mkdir -p /tmp/ray; mount --bind {ray} /tmp/ray; "
        "RAY_AUTH_MODE=token {start}; echo HEAD_STARTED; "
        # PID 1 of the namespace must reap the daemons it adopts (a plain `exec sleep` leaves zombies that
        # `ray stop` waits on): bash does, while it waits.
        "sleep infinity & wait"
    ).format(ray=shlex.quote(str(work / "ray")), start=start)
    log = open(work / "head.log", "w")
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc", "bash", "-c", script],
        env=head_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    client_env = _base_env(home, env)
    client_env.update(
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path), RAY_ADDRESS=f"http://127.0.0.1:{dash}"
    )
    head = Head(f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}", token_path, work, proc.pid, client_env)
    try:
        deadline = time.monotonic() + 120
        while "HEAD_STARTED" not in head.log():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start --head failed:\n{head.log()[-4000:]}")
            time.sleep(0.5)
        _wait_dashboard(head, proc)
        yield head
    finally:
        # `ray stop` inside the head's own PID namespace (the init's children are its only processes).
        ns_pid = _namespace_init(proc.pid)
        if ns_pid is not None and proc.poll() is None:
            subprocess.run(
                ["nsenter", "-t", str(ns_pid), "-p", "-m", "--", "ray", "stop", "--force"],
                env=head_env,
                capture_output=True,
                timeout=120,
            )
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # unshare --kill-child then ends the namespace
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        log.close()


def _namespace_init(unshare_pid: int) -> int | None:
    """The PID (in our namespace) of bash, the forked child of `unshare --fork` that is PID 1 inside."""
    try:
        children = Path(f"/proc/{unshare_pid}/task/{unshare_pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def _wait_dashboard(head: Head, proc: subprocess.Popen, timeout: float = 90) -> None:
    """The job API answers (with the token) once the dashboard's job module is up."""
    token = head.token_path.read_text().strip()
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"head exited:\n{head.log()[-4000:]}")
        req = urllib.request.Request(
            f"{head.dashboard}/api/jobs/", headers={"Authorization": f"Bearer {token}"}
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError) as e:
            last = e
        time.sleep(0.5)
    raise RuntimeError(f"dashboard {head.dashboard} not answering after {timeout:.0f} s ({last})")
