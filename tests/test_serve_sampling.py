"""One sampler, end to end: a real Ray Train run's samples equal `raylstm sample --seed S` and the Serve
app's answer for the same checkpoint, seed, prime and temperatures; a seed-mode model served gives the
trainer's sampler's text (its window re-read from a zero state); a lowercase model prompted with
capitals answers as if prompted in lowercase and says so."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import httpx
import pytest
import torch
from test_serve_support import free_port, lowercase_checkpoint, one_thread, seed_mode_checkpoint

from raylstm.cli import main
from raylstm.config import ServeConfig
from raylstm.sample import Sampler
from raylstm.serve import build_app, start_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def trained(learned_run):
    """A real Ray Train run with samples at every evaluation: the session's (conftest.learned_run, shared
    with test_train), 2 workers, 200 steps, its 3 best checkpoints kept."""
    return learned_run.cfg, learned_run.run


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory, ray_session):
    from ray import serve

    _, run = trained
    cfg = ServeConfig(reload_poll_s=0)
    handle = start_server(run, cfg, port=free_port())
    serve.run(
        build_app(seed_mode_checkpoint(tmp_path_factory), cfg), name="seedmode", route_prefix="/seedmode"
    )
    serve.run(build_app(lowercase_checkpoint(tmp_path_factory), cfg), name="lower", route_prefix="/lower")
    yield handle
    handle.shutdown()


def cli_samples(capsys, checkpoint: Path, prime: str, temps: list[str], length: int, seed: int) -> dict:
    """`raylstm sample` output as {temperature: text}."""
    argv = ["sample", "--checkpoint", str(checkpoint), "--prime", prime, "--length", str(length)]
    assert main([*argv, "--seed", str(seed), "--temperature", *temps]) == 0
    out = capsys.readouterr().out
    blocks = re.split(r"^----- temperature (\S+)  seed (\d+)  sample 0  \(\w+\)\n", out, flags=re.M)[1:]
    got = {}
    for t, s, text in zip(blocks[0::3], blocks[1::3], blocks[2::3]):
        assert int(s) == seed
        got[t] = text[:-1][len(prime) :]  # print() added the newline
    return got


def test_trainer_samples_equal_cli_and_serve(trained, server, capsys):
    cfg, run = trained
    temps = [f"{t:g}" for t in cfg.train.temperatures]
    kept = sorted(p for p in run.glob("checkpoint_[0-9]*") if p.is_dir())
    assert len(kept) >= 2, kept
    for ckpt in kept:
        step = int(ckpt.name.split("_")[1])
        saved = json.loads((ckpt / "samples.json").read_text())
        assert saved["seed"] == cfg.train.seed + step and set(saved["samples"]) == set(temps)
        cli = cli_samples(capsys, ckpt, saved["prime"], temps, cfg.train.sample_chars, saved["seed"])
        assert cli == saved["samples"]
    # The Serve app serves the run's best; its answer for the trainer's seed is the trainer's text.
    best = json.loads((run / "best.json").read_text())["checkpoint"]
    saved = json.loads((run / best / "samples.json").read_text())
    for t, text in saved["samples"].items():
        body = {
            "prompt": saved["prime"],
            "temperature": float(t),
            "max_chars": len(text),
            "seed": saved["seed"],
        }
        r = httpx.post(f"{server.url}/v1/generate", json=body, timeout=60).json()
        assert r["samples"][0]["text"] == text and r["checkpoint"].endswith(best)
    # samples.txt (finish_run, the best checkpoint, seed = train.seed) says how to reproduce itself.
    txt = (run / "samples.txt").read_text()
    assert f"--seed {cfg.train.seed}" in txt
    final = cli_samples(capsys, run, saved["prime"], temps, cfg.train.sample_chars, cfg.train.seed)
    for t, text in final.items():
        assert f"--- temperature {t}  seed {cfg.train.seed} ---\n{saved['prime']}{text}\n" in txt


def test_seed_mode_model_served_as_trained(server, tmp_path_factory):
    ckpt = seed_mode_checkpoint(tmp_path_factory)
    sampler = Sampler.load(ckpt)
    body = {"prompt": "I bought these ", "temperature": 0, "max_chars": 40}
    got = httpx.post(f"{server.url}/seedmode/v1/generate", json=body, timeout=60).json()["samples"][0]["text"]
    text = "I bought these "
    for ch in got:  # the argmax given only the last seed_context chars, from a zero state
        ids = torch.tensor([[sampler.vocab.stoi[c] for c in text[-12:]]])
        with torch.no_grad():
            last = sampler.model(ids)[0][0, -1].clone()
        last[0] = -math.inf
        assert ch == sampler.itos[int(last.argmax())]
        text += ch
    info = httpx.get(f"{server.url}/seedmode/v1/model", timeout=30).json()
    assert info["window_mode"] == "seed" and info["seed_context"] == 12
    sampled = {"prompt": "Great ", "temperature": 1.0, "max_chars": 50, "seed": 8}
    r = httpx.post(f"{server.url}/seedmode/v1/generate", json=sampled, timeout=60).json()
    from raylstm.sample import SampleParams

    assert (
        r["samples"][0]["text"]
        == sampler.complete("Great ", SampleParams(temperature=1.0, max_chars=50, seed=8)).text
    )


def test_lowercase_model_prompted_with_capitals(server):
    def ask(prompt: str) -> dict:
        body = {"prompt": prompt, "temperature": 0.7, "max_chars": 60, "seed": 4}
        r = httpx.post(f"{server.url}/lower/v1/generate", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    loud, quiet = ask("I BOUGHT These "), ask("i bought these ")
    assert loud["samples"][0]["text"] == quiet["samples"][0]["text"]
    assert loud["prompt"] == "i bought these " and loud["prompt_changes"] == ["lowercased"]
    assert loud["unknown_chars"] == [] and quiet["prompt_changes"] == []
