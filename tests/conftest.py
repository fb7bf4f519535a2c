"""Shared fixtures: one real local Ray per test session, and the shared review data when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never touch ~/.ray (token file) and never need auth on their private cluster.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
AMAZON = SHARED / "data" / "amazon"


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
