"""The training progress line (raylstm.progress): the driver follows metrics.jsonl as RunLog writes it."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import pytest

from raylstm.progress import MetricsFollower, RunProgress, format_duration


def _line(step: int, t: float, cps: float = 40_000.0, val_bpc: float | None = None) -> dict:
    line = {"step": step, "time": t, "chars_per_s_total": cps, "train_loss": 1.5}
    if val_bpc is not None:
        line["val_bpc"] = val_bpc
    return line


def test_eta_is_the_steps_left_at_the_rate_since_the_first_report() -> None:
    p = RunProgress(total_steps=1000)
    p.update(_line(1, 100.0))  # the first report comes after start-up: the rate is measured from here
    assert p.eta_s() is None
    p.update(_line(101, 150.0))  # 100 steps in 50 s
    assert p.eta_s() == pytest.approx(899 * 0.5)
    assert p.update(_line(201, 210.0, cps=38_000.0, val_bpc=2.5))  # an evaluation (slower interval)
    assert p.eta_s() == pytest.approx(799 * 110.0 / 200)
    assert p.plain_line() == (
        "[raylstm] step 201/1000 (20%) | 38.0k chars/s | ETA 7:19 | val 2.500 bpc @ 201"
    )
    p.update(_line(301, 260.0, val_bpc=2.7))
    assert p.eval_line() == "[raylstm] step 301/1000: val 2.700 bpc (best 2.500)"
    assert [format_duration(s) for s in (0, 59.6, 61, 3725)] == ["0:00", "1:00", "1:01", "1:02:05"]


def _write_run(path: Path, lines: list[dict], pause_s: float) -> threading.Thread:
    """RunLog's side: append lines one by one (the last one in two writes, as a slow disk might)."""

    def write() -> None:
        for i, line in enumerate(lines):
            text = json.dumps(line) + "\n"
            with open(path, "a") as f:
                if i == len(lines) - 1:
                    f.write(text[:10])
                    f.flush()
                    time.sleep(pause_s)
                    text = text[10:]
                f.write(text)
            time.sleep(pause_s)

    t = threading.Thread(target=write)
    t.start()
    return t


def test_off_a_terminal_plain_lines_at_the_interval_and_every_evaluation(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(_line(400, 1.0)) + "\n")  # an earlier attempt of a continued run
    lines = [_line(s, 10.0 + s / 10, val_bpc=2.0 if s == 250 else None) for s in range(25, 501, 25)]
    out = io.StringIO()  # not a terminal
    with MetricsFollower(path, 500, interval_s=3600, poll_s=0.01, stream=out):
        _write_run(path, lines, pause_s=0.02).join()
    shown = out.getvalue().splitlines()
    # The first report, the evaluation, and the final state: no line per report, nothing from before.
    assert shown[0].startswith("[raylstm] step 25/500 (5%) | 40.0k chars/s | ETA")
    assert shown[1] == "[raylstm] step 250/500: val 2.000 bpc (best so far)"
    assert shown[-1] == "[raylstm] step 500/500 (100%) | 40.0k chars/s | ETA 0:00 | val 2.000 bpc @ 250"
    assert len(shown) == 3


def test_on_a_terminal_one_line_redrawn_in_place(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [_line(s, 10.0 + s / 10, val_bpc=2.25 if s == 100 else None) for s in range(20, 201, 20)]
    out = io.StringIO()
    with MetricsFollower(path, 200, live=True, poll_s=0.01, stream=out):
        _write_run(path, lines, pause_s=0.02).join()
    text = out.getvalue()
    # tqdm redraws with carriage returns; the only newlines are the evaluation line and the final close.
    assert text.count("\n") == 2
    assert "[raylstm] step 100/200: val 2.250 bpc (best so far)\n" in text
    final = text.rstrip("\n").split("\r")[-1]
    assert "200/200 steps" in final and "40.0k chars/s" in final and "val 2.250 bpc @ 100" in final
