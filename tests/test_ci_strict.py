"""A CI run with a test tool removed fails (tests/conftest.py turns a skip into a failure under CI=true).

The tool really is removed: a real test of the suite (the independent 7-Zip PPMd check) runs in a child
pytest with a PATH that has no 7-Zip on it, and must fail naming the reason (outside CI the same test
skips, printing that reason under -rs). Pure Python, no Ray: a few seconds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NEEDS_7ZIP = "tests/test_evaluate.py::test_ppmd_is_a_real_code_and_matches_7zip"


def _run_without_7zip(tmp_path: Path, ci: str) -> subprocess.CompletedProcess:
    empty_bin = tmp_path / "bin"  # PATH holds nothing: shutil.which("7zz"/"7z") finds no 7-Zip
    empty_bin.mkdir(exist_ok=True)
    env = dict(os.environ)
    env.update(PATH=str(empty_bin), CI=ci)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", NEEDS_7ZIP],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_missing_tool_fails_the_run_under_ci(tmp_path: Path) -> None:
    pytest.importorskip("pyppmd")  # the test under check needs it before it looks for 7-Zip
    ci = _run_without_7zip(tmp_path, "true")
    out = ci.stdout + ci.stderr
    assert ci.returncode == 1, out
    assert "1 failed" in out and "skipped under CI=true" in out and "7-Zip not installed" in out, out
