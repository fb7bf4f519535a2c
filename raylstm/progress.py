"""The progress of a training run as the user sees it: the driver follows the run's metrics.jsonl.

    Train workers --report()--> Train controller: RunLog appends one line per report to metrics.jsonl
    driver (this module, a thread while fit() runs): reads the new lines every `poll_s`
        on a terminal:      one live tqdm line   [step/total, chars/s, ETA, last val bpc]
                            + one line per evaluation, printed above it
        off a terminal:     a plain line every `interval_s` (CI, `ray job logs`, a file),
                            + one line per evaluation

The driver follows the file rather than the workers' console output because the reports come from the
workers through the controller (an actor, not the driver): the file is the one record of the run that
the driver can read, and reading it costs nothing to training. Ray's own output (worker and actor log
lines, Ray Data's per-execution progress) is kept from the console by `quiet_ray_data` and
`ray.init(log_to_driver=False)` unless `--verbose` (see `raylstm.train.train`).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

PREFIX = "[raylstm]"


def format_duration(seconds: float) -> str:
    """h:mm:ss or m:ss, like tqdm's own elapsed/remaining fields."""
    s = int(max(0.0, seconds) + 0.5)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class RunProgress:
    """Folds metrics.jsonl lines into what the progress line shows (no I/O: unit-testable).

    chars/s is the latest report's total over all workers; the ETA divides the steps left by the step
    rate since this attempt's first report (evaluations included, start-up not), so it settles quickly
    and stays honest about evaluation pauses.
    """

    def __init__(self, total_steps: int) -> None:
        self.total_steps = total_steps
        self.step = 0
        self.chars_per_s: float | None = None
        self.val_bpc: float | None = None
        self.val_step: int | None = None
        self.best_bpc: float | None = None
        self._first: tuple[int, float] | None = None  # (step, time) of the first report seen
        self._last_time: float | None = None

    def update(self, line: dict[str, Any]) -> bool:
        """Take one metrics line; True when it carried an evaluation."""
        step, t = int(line.get("step") or 0), line.get("time")
        if self._first is None and isinstance(t, (int, float)):
            self._first = (step, float(t))
        self._last_time = float(t) if isinstance(t, (int, float)) else self._last_time
        self.step = max(self.step, step)
        if line.get("chars_per_s_total") is not None:
            self.chars_per_s = float(line["chars_per_s_total"])
        if line.get("val_bpc") is None:
            return False
        self.val_bpc, self.val_step = float(line["val_bpc"]), step
        self.best_bpc = self.val_bpc if self.best_bpc is None else min(self.best_bpc, self.val_bpc)
        return True

    def eta_s(self) -> float | None:
        if self._first is None or self._last_time is None:
            return None
        steps, secs = self.step - self._first[0], self._last_time - self._first[1]
        if steps <= 0 or secs <= 0:
            return None
        return max(0, self.total_steps - self.step) * secs / steps

    def fields(self) -> list[str]:
        """The parts after the step count: chars/s, ETA, last val bpc."""
        out = []
        if self.chars_per_s is not None:
            out.append(f"{self.chars_per_s / 1000:.1f}k chars/s")
        eta = self.eta_s()
        out.append(f"ETA {format_duration(eta)}" if eta is not None else "ETA ?")
        if self.val_bpc is not None:
            out.append(f"val {self.val_bpc:.3f} bpc @ {self.val_step}")
        return out

    def plain_line(self) -> str:
        pct = 100.0 * self.step / self.total_steps if self.total_steps else 0.0
        return " | ".join([f"{PREFIX} step {self.step}/{self.total_steps} ({pct:.0f}%)", *self.fields()])

    def eval_line(self) -> str:
        best = " (best so far)" if self.val_bpc == self.best_bpc else f" (best {self.best_bpc:.3f})"
        return f"{PREFIX} step {self.val_step}/{self.total_steps}: val {self.val_bpc:.3f} bpc{best}"


class MetricsFollower:
    """A thread that reads the lines appended to `path` after it started and shows the progress.

    `live` (default: `stream` is a terminal) draws one tqdm line redrawn in place; otherwise a plain line
    at most every `interval_s` seconds. Either way each evaluation gets a line of its own, and the last
    state is shown when the follower stops. Use as a context manager around `trainer.fit()`.
    """

    def __init__(
        self,
        path: str | Path,
        total_steps: int,
        *,
        live: bool | None = None,
        interval_s: float = 30.0,
        poll_s: float = 0.5,
        stream: IO[str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.interval_s, self.poll_s = interval_s, poll_s
        self.state = RunProgress(total_steps)
        # Lines already in the file belong to earlier attempts of a continued run: start after them.
        self._offset = self.path.stat().st_size if self.path.exists() else 0
        self._partial = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar: Any = None
        self._last_plain = -float("inf")
        self._changed = False

    def __enter__(self) -> MetricsFollower:
        if self.live:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.state.total_steps,
                unit="step",
                file=self.stream,
                dynamic_ncols=True,
                bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps [{elapsed}{postfix}]",
                desc=f"{PREFIX} train",
            )
        self._thread = threading.Thread(target=self._run, name="raylstm-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.poll()  # the lines written after the thread's last look
        if self._bar is not None:
            self._bar.close()
        elif self._changed:
            self._print(self.state.plain_line())

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def _new_lines(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, encoding="utf-8") as f:
                f.seek(self._offset)
                chunk = f.read()
                self._offset = f.tell()
        except FileNotFoundError:
            return []
        text, self._partial = (self._partial + chunk), ""
        lines = text.split("\n")
        self._partial = lines.pop()  # a line still being written: finish it on the next read
        out = []
        for raw in lines:
            if raw.strip():
                try:
                    out.append(json.loads(raw))
                except json.JSONDecodeError:
                    continue  # not a metrics line (never written by RunLog); nothing to show for it
        return out

    def poll(self) -> None:
        """Read what is new and show it (called by the thread, and once more on exit)."""
        for line in self._new_lines():
            self._changed = True
            if self.state.update(line):
                self._print(self.state.eval_line())
        if self._bar is not None:
            self._bar.n = self.state.step
            self._bar.set_postfix_str(", ".join(self.state.fields()), refresh=False)
            self._bar.refresh()
        elif self._changed and time.monotonic() - self._last_plain >= self.interval_s:
            self._print(self.state.plain_line())
            self._changed = False

    def _print(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)
            self._last_plain = time.monotonic()
