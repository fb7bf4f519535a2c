"""TensorBoard event files beside metrics.jsonl (train.RunLog), read back with TensorBoard's own reader."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from raylstm.train import METRICS_FILE, RunLog, read_metrics


def _read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of every event file in run_dir, by tag, through TensorBoard's EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _report(step: int, loss: float, val_bpc: float | None = None) -> list[dict]:
    """What two workers report at `step` (rank 0 and rank 1 differ only in their own chars/s)."""
    ranks = []
    for rank, cps in ((0, 1000.0 + step), (1, 900.0 + step)):
        m = {
            "step": step,
            "epoch": 0,
            "lr": 1e-3 * step,
            "train_loss": loss,
            "chars_per_s": cps,
            "rank": rank,
        }
        if val_bpc is not None:
            m.update(val_loss=val_bpc * math.log(2), val_bpc=val_bpc)
        ranks.append(m)
    return ranks


def test_runlog_writes_the_metrics_jsonl_scalars_as_tensorboard_events(tmp_path: Path) -> None:
    log = RunLog(str(tmp_path))
    log.after_report(None, _report(25, 3.1), None)
    log.after_report(None, _report(50, 2.7, val_bpc=3.6), None)
    log.after_report(None, _report(75, float("nan")), None)  # a NaN is skipped, not written as a point
    assert list(tmp_path.glob("events.out.tfevents.*")), "no event file in the run dir"

    rows = read_metrics(tmp_path / METRICS_FILE)
    tb = _read_scalars(tmp_path)
    assert tb["val/bpc"] == [(50, pytest.approx(rows[1]["val_bpc"]))]
    assert tb["train/loss"] == [(25, pytest.approx(3.1)), (50, pytest.approx(2.7))]
    assert tb["train/bpc"][0] == (25, pytest.approx(rows[0]["train_loss"] / math.log(2)))
    assert [v for _, v in tb["throughput/chars_per_s"]] == [
        pytest.approx(r["chars_per_s_total"]) for r in rows
    ]
    assert rows[2]["train_loss"] is None  # metrics.jsonl writes the NaN as null

    # A continued run (a new RunLog on the same dir) adds to the same TensorBoard run.
    RunLog(str(tmp_path)).after_report(None, _report(100, 2.2, val_bpc=3.1), None)
    assert [s for s, _ in _read_scalars(tmp_path)["val/bpc"]] == [50, 100]
    assert json.loads((tmp_path / METRICS_FILE).read_text().splitlines()[-1])["val_bpc"] == 3.1
