"""The one benchmark command: every bench/bench_*.py, the Keras peer, the original project's published
weights (seed_peer) and (opt-in) the quality run, each in its own process, then bench/REPORT.md with their tables, the machine, the exact commands, and PNG plots.

    make bench                                   # = .venv/bin/python -m bench.run_all
    .venv/bin/python -m bench.run_all --quick    # each piece in its quick mode (~1 min each)
    .venv/bin/python -m bench.run_all --with-quality   # + the 20-minute cpu-quality training run
    .venv/bin/python -m bench.run_all --with-conditioning   # + the 20-minute conditioned run and its figures
    .venv/bin/python -m bench.run_all --with-plan200m   # + the seed's 200M-prediction plan (~35 minutes)

Each piece runs in a fresh Python process (`python -m bench.run_all --one NAME`): a piece that starts Ray
with its own resources, or crashes, or hangs past --timeout, cannot disturb the others. A missing or
failing piece is reported in REPORT.md with its error, never left out silently.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
# The areas the issues asked for; each is reported even when its module is missing.
EXPECTED = ["bench_data", "bench_train", "bench_serve", "bench_eval"]
PY = ".venv/bin/python"


def discover() -> list[str]:
    found = sorted(p.stem for p in BENCH.glob("bench_*.py"))
    return sorted(
        set(found) | set(EXPECTED),
        key=lambda n: (n not in EXPECTED, EXPECTED.index(n) if n in EXPECTED else 0, n),
    )


def command_for(name: str, quick: bool) -> str:
    return f"{PY} -m bench.{name}" + (" --quick" if quick else "")


# --- child mode: run one piece, write its markdown ----------------------------------------------------
def run_one(name: str, out_dir: Path, quick: bool) -> int:
    """Import bench.<name> and call run(out_dir, quick); markdown to out_dir/<name>.md."""
    mod = importlib.import_module(f"bench.{name}")
    md = mod.run(out_dir, quick=quick)
    if not isinstance(md, str) or not md.strip():
        raise RuntimeError(f"bench.{name}.run returned no Markdown section")
    (out_dir / f"{name}.md").write_text(md)
    return 0


# --- parent mode ----------------------------------------------------------------------------------------
def run_piece(name: str, out_dir: Path, quick: bool, timeout: float) -> dict[str, Any]:
    md_path = out_dir / f"{name}.md"
    log_path = out_dir / f"{name}.log"
    md_path.unlink(missing_ok=True)
    if not (BENCH / f"{name}.py").exists():
        return {
            "name": name,
            "status": "missing",
            "seconds": 0.0,
            "error": f"bench/{name}.py does not exist yet",
        }
    cmd = [sys.executable, "-m", "bench.run_all", "--one", name, "--out", str(out_dir)] + (
        ["--quick"] if quick else []
    )
    t0 = time.perf_counter()
    print(f"[bench] {name} ... ({command_for(name, quick)})", flush=True)
    with open(log_path, "w") as log:
        try:
            # Own session: on timeout the whole group (the piece's Ray workers included) is ended.
            proc = subprocess.Popen(
                cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            rc = None
    secs = time.perf_counter() - t0
    tail = log_path.read_text(errors="replace")[-3000:]
    if rc is None:
        status, err = "timeout", f"killed after {timeout:.0f} s\n{tail}"
    elif rc != 0 or not md_path.exists():
        status, err = "failed", f"exit code {rc}\n{tail}"
    else:
        status, err = "ok", ""
    print(f"[bench] {name}: {status} in {secs:.0f} s", flush=True)
    return {
        "name": name,
        "status": status,
        "seconds": secs,
        "error": err,
        "markdown": md_path.read_text() if status == "ok" else "",
    }


def machine() -> dict[str, str]:
    info = {
        "date (UTC)": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M"),
        "host": platform.node(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "logical CPUs": str(os.cpu_count()),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["CPU"] = line.split(":", 1)[1].strip()
                break
        mem_kb = int(
            next(
                ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")
            ).split()[1]
        )
        info["memory"] = f"{mem_kb / 2**20:.1f} GiB"
        info["load average at start"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except (OSError, StopIteration, ValueError):
        pass
    for pkg in ("torch", "ray", "keras", "numpy"):
        try:
            info[pkg] = importlib.import_module(pkg).__version__
        except ImportError:
            info[pkg] = "not installed"
    try:
        info["git commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        if dirty:
            info["git commit"] += " (with uncommitted changes)"
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        import torch

        if torch.cuda.is_available():
            info["GPU"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


# --- plots ----------------------------------------------------------------------------------------------
def plot_learning_curves(out_dir: Path, png: Path) -> Path | None:
    """Peer training curves (bits/char of the training loss vs seconds) and the quality run's val bpc."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = []
    peer = out_dir / "peer.json"
    if peer.exists():
        for name, r in json.loads(peer.read_text())["rows"].items():
            if r.get("curve"):
                t, _, bpc = zip(*r["curve"])
                series.append((f"{name} (train)", t, bpc, "-"))
    quality = out_dir / "quality.json"
    if quality.exists():
        # bench.quality's curve: the val points, minutes since Ray start
        curve = json.loads(quality.read_text())["curve"]
        if curve:
            series.append(
                ("cpu-quality (val)", [c["minutes"] * 60 for c in curve], [c["val_bpc"] for c in curve], "o-")
            )
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, x, y, style in series:
        ax.plot(x, y, style, label=label, alpha=0.85)
    ax.set_xlabel("seconds of training")
    ax.set_ylabel("bits per character")
    ax.set_title("Learning curves (same machine)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def plot_throughput(out_dir: Path, png: Path) -> Path | None:
    """Bars of supervised predictions/s: the peer table, plus any `throughput` dicts other pieces wrote
    as out_dir/<area>.json ({"throughput": {"label": value_per_s}})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars: list[tuple[str, float]] = []
    peer = out_dir / "peer.json"
    if peer.exists():
        for name, r in json.loads(peer.read_text())["rows"].items():
            bars.append((f"peer: {name}", r["preds"] / r["seconds"]))
    for f in sorted(out_dir.glob("*.json")):
        if f.name in ("peer.json", "quality.json"):
            continue
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and isinstance(data.get("throughput"), dict):
            bars += [(f"{f.stem}: {k}", float(v)) for k, v in data["throughput"].items()]
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(bars) + 1.5))
    labels, values = zip(*bars)
    ax.barh(range(len(bars)), values, color="tab:blue")
    ax.set_yticks(range(len(bars)), labels)
    ax.invert_yaxis()
    ax.set_xscale("log")
    # A log axis has no zero: start well below the smallest bar so lengths are not read as ratios of 0.
    ax.set_xlim(left=min(values) / 10, right=max(values) * 3)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:,.0f}", va="center", fontsize=8)
    ax.set_xlabel("supervised predictions (chars) per second, log scale")
    ax.set_title("Throughput on this machine")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


# --- the report -----------------------------------------------------------------------------------------
def write_report(
    results: list[dict[str, Any]],
    info: dict[str, str],
    argv: list[str],
    out_dir: Path,
    report: Path,
    plots: list[Path],
    invocation: str | None = None,
    title: str = "raylstm benchmark report",
) -> Path:
    produced = f"`{invocation}`"
    if invocation is None:
        produced = f"`{PY} -m bench.run_all" + ("" if not argv else " " + " ".join(argv)) + "`"
        produced += " (= `make bench`)" if not argv else f' (= `make bench BENCH_ARGS="{" ".join(argv)}"`)'
    lines = [
        f"# {title}",
        "",
        f"Produced by {produced}. Every table below was measured side by side in that "
        "one run, on the machine described here; each section names the command that regenerates it alone.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in info.items()],
        "",
        "## Pieces",
        "",
        "| piece | status | seconds | command |",
        "|---|---|---:|---|",
    ]
    for r in results:
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']:.0f} | `{r['command']}` |")
    lines.append("")
    for p in plots:
        lines += [f"![{p.stem}]({os.path.relpath(p, report.parent)})", ""]
    for r in results:
        if r["status"] == "ok":
            lines += [r["markdown"].rstrip(), ""]
        else:
            lines += [
                f"## {r['name']}: {r['status'].upper()}",
                "",
                f"Command: `{r['command']}`",
                "",
                "```",
                r["error"].strip()[-2500:],
                "```",
                "",
            ]
    report.write_text("\n".join(lines))
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="every piece in quick mode")
    ap.add_argument(
        "--with-quality", action="store_true", help="also the ~20-minute cpu-quality training run"
    )
    ap.add_argument(
        "--with-conditioning",
        action="store_true",
        help="also bench.conditioning: the conditioned 20-minute run and its figures (beside the quality run)",
    )
    ap.add_argument(
        "--with-plan200m",
        action="store_true",
        help="also bench.plan200m: the ceiling grid, then 200M predictions through raylstm train (~35 min)",
    )
    ap.add_argument("--only", nargs="*", help="run only these pieces (e.g. bench_eval peer_keras)")
    ap.add_argument(
        "--timeout", type=float, default=900.0, help="seconds before a piece is killed (quality: 1800)"
    )
    ap.add_argument("--out", default=str(BENCH / "out"), help="raw outputs (JSON, logs, run dirs)")
    ap.add_argument("--report", default=str(BENCH / "REPORT.md"))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args(argv)
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # private local clusters only; never touches ~/.ray
    os.environ.setdefault("KERAS_BACKEND", "torch")  # the peer's backend; also what machine() reports

    if args.one:
        try:
            return run_one(args.one, out_dir, args.quick)
        except Exception:
            traceback.print_exc()
            return 1

    pieces = discover() + ["peer_keras", "seed_peer"] + (["quality"] if args.with_quality else [])
    pieces += ["conditioning"] if args.with_conditioning else []
    pieces += ["plan200m"] if args.with_plan200m else []
    if args.only:
        pieces = [p for p in pieces if p in args.only] + [p for p in args.only if p not in pieces]
    info = machine()
    results = []
    for name in pieces:
        # quality trains for ~20 min, conditioning ~40 min (its two 20-minute runs) + ~8 of figures; bench_scale
        # prepares 5 GB of corpora twice (~25 min; 10 MB and 100 MB only in --quick)
        # plan200m: ~3 min of ceiling grid, ~30 min of training, ~5 min of held-out scoring
        long = {"quality": 1800.0, "conditioning": 3600.0, "bench_scale": 600.0 if args.quick else 3600.0}
        long["plan200m"] = 900.0 if args.quick else 3600.0
        r = run_piece(name, out_dir, args.quick, long.get(name, args.timeout))
        r["command"] = command_for(name, args.quick)
        results.append(r)
    report = Path(args.report).resolve()
    # The PNGs sit beside the report (bench/ by default) so its relative links work wherever it is written.
    plots = [
        p
        for p in (
            plot_learning_curves(out_dir, report.parent / "learning_curves.png"),
            plot_throughput(out_dir, report.parent / "throughput.png"),
        )
        if p is not None
    ]
    passed = sys.argv[1:] if argv is None else argv
    write_report(results, info, passed, out_dir, report, plots)
    print(f"[bench] wrote {report}")
    # A missing piece is reported, not an error of this command; a failed or hung one is.
    return 0 if all(r["status"] in ("ok", "missing") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
