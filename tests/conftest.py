"""Shared fixtures: one real local Ray per test session, and the shared review data when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never touch ~/.ray (token file) and never need auth on their private cluster.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray Train V2's controller polls its workers once per health check (default 2 s) and takes one report off
# each worker's size-1 queue per poll, so every checkpoint report of a tiny test run waits up to 2 s, and
# so do the worker group's start and finish. Ray propagates this variable to the controller and the
# workers, where raylstm's MIN_REPORT_INTERVAL_S reads it too, so the loop's report pacing follows it.
# The tests check state, not timing; CLI subprocesses inherit it. Set it (e.g. to 2.0) to run at the default.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

# Under CI (.ci/run sets up everything the suite drives: Chromium, 7-Zip, sshd, the dev extra's openai,
# schemathesis and keras, pyppmd, ../shared), a skip means CI lost something it promised, so it fails: a
# run that passes by skipping proves nothing. Outside CI a skip stays a skip, with its reason (-rs).
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (
            f"skipped under CI=true, where .ci/run provides what this test needs, so this fails: {reason}"
        )


SHARED = Path(__file__).resolve().parents[1].parent / "shared"
AMAZON = SHARED / "data" / "amazon"


@pytest.fixture(scope="module")
def conditioned_model():
    """conditioned_support's small conditioned model: (model, vocab, condition vocabulary, config), with
    the module that asks for it run on one torch thread (tiny matrices: a second thread only waits)."""
    import torch
    from conditioned_support import trained_conditioned

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield trained_conditioned()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def amazon_dir() -> Path:
    """../shared/data/amazon, or a clean skip where it is absent."""
    if not AMAZON.is_dir():
        pytest.skip(f"shared review data not present at {AMAZON}")
    return AMAZON


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray, started once per test session with small explicit resources.

    4 logical CPUs on a 2-core machine: 2 train workers at 0.5-1 CPU still leave Ray Data a CPU
    (with exactly 2, the run hangs waiting for read tasks; see RAY-NOTES).
    """
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=4,
            include_dashboard=False,
            object_store_memory=512 * 1024**2,
            logging_level="WARNING",
            log_to_driver=False,
        )
    yield ray
    # Serve and Train leave actors; shutting down here would only slow the last test.


@pytest.fixture(scope="session")
def learned_run(ray_session, tmp_path_factory):
    """One real 2-worker Ray Train run on review text (train_support.tiny_config, 200 steps, an evaluation,
    samples and a checkpoint every 50), shared by the tests that need a trained run: test_train checks
    what it learned and wrote, test_serve_sampling that its samples are `raylstm sample`'s and the Serve
    app's. Read it, never write into it."""
    from types import SimpleNamespace

    from train_support import make_windows, review_sources, tiny_config

    from raylstm.train import fit_windows

    windows = make_windows(review_sources())
    cfg = tiny_config(max_steps=200, eval_every=50)
    storage = tmp_path_factory.mktemp("learned")
    result = fit_windows(cfg, windows.vocab, windows.train, windows.val, storage=str(storage), name="learn")
    return SimpleNamespace(cfg=cfg, windows=windows, result=result, run=Path(result.run_dir))
