"""Bayes-rule guidance (raylstm.guidance) measured on bench.conditioning's conditioned model: the share of
guided samples the independent judge (TF-IDF + LR fit on the real training reviews, the eval stage's)
calls negative at 1 star and positive at 5, for each guidance weight w and temperature.

    select  SELECT_SAMPLES per rating at T = 0.8 on seeds of their own (SELECT_SEED + ...): for each w
            of the list, the judge's shares; the chosen w is the one whose worse share is highest (ties:
            the smaller w). Choosing w by the judge's verdict is a sweep: this set is the only one it
            looks at.
    sweep   every w at every temperature on the eval stage's own seeds (1000 x rating + i, as its
            unguided figure), 200 per rating: the chosen w's row there is a fixed w on fresh seeds; the
            other rows are the whole sweep, reported as such. w = 0 must reproduce the plain sampler's
            texts (checked against Sampler.generate, counted in `plain_equal`).
    confirm (--confirm, instead of select + sweep) the temperature and w chosen together on the select
            set (every T x w of the lists), then that one setting on seeds neither set used
            (CONFIRM_SEED + ...), 200 per rating: the figure the target is read from.
    shown   1, 3 and 5 stars (Musical Instruments, T = 0.8, seed 77: the unguided samples' seeds) at the
            chosen w.

Cost per (w, T): wall seconds, characters written and model rows stepped per character (5 with the
category known: every rating's row reads each character).

    .venv/bin/python -m bench.conditioning --out DIR --stage guided --guidance 0 1 2 4   # on DIR's runs
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from bench.conditioning import out_paths
from bench.conditioning_eval import (
    SAMPLE_CHARS,
    SAMPLE_TEMPERATURE,
    SAMPLES_PER_RATING,
    SHOW_CATEGORY,
    conditioned_samples,
    split_rows_with_conditions,
)

GUIDANCE = (0.0, 1.0, 2.0, 4.0)
TEMPERATURES = (0.8, 0.5)
SELECT_SAMPLES = 50  # per rating: the set w is chosen on
SELECT_SEED = 900_000  # + 1000 x rating + i: never one of the figures' seeds (1000 x rating + i, i < 200)
CONFIRM_SEED = 2_000_000  # + 1000 x rating + i: neither the select set's seeds nor the figures'
WANT = {1: "negative", 5: "positive"}


def guided_samples(
    sampler: Any, rating: int, categories: list[str], n: int, seed: int, temperature: float, w: float
) -> dict[str, Any]:
    """n guided reviews at `rating` (categories in turn, as conditioned_samples), with the cost and the
    model's own posterior of `rating` for each."""
    from raylstm.guidance import start_guided
    from raylstm.sample import SampleParams, _eval_mode

    params = [
        SampleParams(
            temperature=temperature, max_chars=SAMPLE_CHARS, stop=("\n",), seed=seed + i,
            conditions={"rating": rating, "category": categories[i % len(categories)]},
        )
        for i in range(n)
    ]  # fmt: skip
    t0 = time.perf_counter()
    with _eval_mode(sampler.model):
        batch = start_guided(sampler, ["\n"] * n, params, w).run()
    wall = time.perf_counter() - t0
    post = batch.posterior()
    own = post.probs[:, post.values.index(str(rating))]
    chars = sum(r.n_chars for r in batch.rows)  # the stop "\n" included: it was generated too
    return {
        "texts": [r.text for r in batch.rows],
        "wall_s": wall,
        "chars": chars,
        "row_steps": batch.row_steps,
        "own_posterior": [float(p) for p in own],
    }


def judged(judge: Any, texts: list[str], want: str, categories: list[str]) -> dict[str, Any]:
    verdict = judge.predict(texts).tolist()
    n = len(texts)
    cats = [categories[i % len(categories)] for i in range(n)]
    return {
        "n": n,
        "share_as_conditioned": sum(v == want for v in verdict) / n,
        "want": want,
        "mean_chars": sum(map(len, texts)) / n,
        "by_category": {
            c: sum(v == want for v, k in zip(verdict, cats) if k == c) / cats.count(c)
            for c in categories
            if c in cats
        },
    }


def select_shares(
    sampler: Any, judge: Any, categories: list[str], n: int, temperature: float, w: float
) -> dict[str, float]:
    """Per asked rating, the share of n guided samples on the select seeds that the judge reads as that
    rating (the figure every choice of T and w is made on; never the figure seeds)."""
    return {
        str(r): judged(
            judge,
            guided_samples(sampler, r, categories, n, SELECT_SEED + 1000 * r, temperature, w)["texts"],
            want,
            categories,
        )["share_as_conditioned"]
        for r, want in WANT.items()
    }


def guided_figures(
    sampler: Any,
    judge: Any,
    categories: list[str],
    weights: list[float],
    temperatures: list[float],
    quick: bool = False,
) -> dict[str, Any]:
    n = 20 if quick else SAMPLES_PER_RATING
    n_select = 10 if quick else SELECT_SAMPLES
    t_start = time.perf_counter()
    out: dict[str, Any] = {
        "weights": list(weights),
        "temperatures": list(temperatures),
        "n": n,
        "select": {"n": n_select, "temperature": SAMPLE_TEMPERATURE, "seed": SELECT_SEED, "by_w": {}},
        "sweep": {},
    }
    for w in weights:
        shares = select_shares(sampler, judge, categories, n_select, SAMPLE_TEMPERATURE, w)
        out["select"]["by_w"][f"{w:g}"] = shares
        print(f"[guided] select w={w:g}: {shares}", flush=True)
    chosen = max(weights, key=lambda w: (min(out["select"]["by_w"][f"{w:g}"].values()), -w))
    out["chosen_w"] = chosen
    for T in temperatures:
        sweep: dict[str, Any] = {}
        for w in weights:
            row: dict[str, Any] = {}
            for rating, want in WANT.items():
                s = guided_samples(sampler, rating, categories, n, 1000 * rating, T, w)
                fig = judged(judge, s["texts"], want, categories)
                fig.update(
                    first=s["texts"][:3],
                    wall_s=s["wall_s"],
                    chars=s["chars"],
                    chars_per_s=s["chars"] / s["wall_s"],
                    rows_per_char=s["row_steps"] / s["chars"],
                    own_posterior_mean=sum(s["own_posterior"]) / n,
                )
                if w == 0:  # the plain sampler on the same seeds: the texts must be the same
                    t0 = time.perf_counter()
                    plain = conditioned_samples(sampler, rating, categories, n, 1000 * rating, T)
                    fig["plain_wall_s"] = time.perf_counter() - t0
                    fig["plain_equal"] = sum(a == b for a, b in zip(plain, s["texts"]))
                row[str(rating)] = fig
                print(
                    f"[guided] T={T:g} w={w:g} {rating} star: {fig['share_as_conditioned']:.3f} "
                    f"{fig['chars_per_s']:,.0f} chars/s {fig['rows_per_char']:.2f} rows/char "
                    f"plain_equal={fig.get('plain_equal')}",
                    flush=True,
                )
            sweep[f"{w:g}"] = row
        out["sweep"][f"{T:g}"] = sweep
    shown = {}
    for r in (1, 3, 5):
        s = guided_samples(sampler, r, [SHOW_CATEGORY], 3, 77, SAMPLE_TEMPERATURE, chosen)
        shown[str(r)] = s["texts"]
    out["shown_samples"] = shown
    out["wall_s"] = time.perf_counter() - t_start
    return out


def confirm_figures(
    sampler: Any,
    judge: Any,
    categories: list[str],
    weights: list[float],
    temperatures: list[float],
    quick: bool = False,
) -> dict[str, Any]:
    """(T, w) chosen together on the select set (the highest worse share; ties: the smaller w, then the
    higher T), then measured once on seeds that no choice looked at."""
    n = 20 if quick else SAMPLES_PER_RATING
    n_select = 10 if quick else SELECT_SAMPLES
    t_start = time.perf_counter()
    by = []
    for T in temperatures:
        for w in weights:
            shares = select_shares(sampler, judge, categories, n_select, T, w)
            by.append({"temperature": T, "w": w, **shares})
            print(f"[confirm] select T={T:g} w={w:g}: {shares}", flush=True)
    chosen = max(by, key=lambda s: (min(s["1"], s["5"]), -s["w"], s["temperature"]))
    T, w = chosen["temperature"], chosen["w"]
    result: dict[str, Any] = {}
    for r, want in WANT.items():
        s = guided_samples(sampler, r, categories, n, CONFIRM_SEED + 1000 * r, T, w)
        fig = judged(judge, s["texts"], want, categories)
        fig.update(
            first=s["texts"][:3],
            chars_per_s=s["chars"] / s["wall_s"],
            own_posterior_mean=sum(s["own_posterior"]) / n,
        )
        result[str(r)] = fig
        print(
            f"[confirm] T={T:g} w={w:g} {r} star: {fig['share_as_conditioned']:.3f} on fresh seeds",
            flush=True,
        )
    return {
        "select": {"n": n_select, "seed": SELECT_SEED, "by": by},
        "chosen": {"temperature": T, "w": w},
        "confirm": {"n": n, "seed": CONFIRM_SEED, "by_rating": result},
        "weights": list(weights),
        "temperatures": list(temperatures),
        "wall_s": time.perf_counter() - t_start,
    }


def confirm_markdown(c: dict[str, Any]) -> list[str]:
    sel, ch, conf = c["select"], c["chosen"], c["confirm"]
    one, five = conf["by_rating"]["1"], conf["by_rating"]["5"]
    return [
        "",
        "### Guidance confirmed on fresh seeds (T and w fixed before they were drawn)",
        "",
        f"T and w chosen together on the select set ({sel['n']} per rating, seeds from {sel['seed']:,}; "
        "1 star negative / 5 stars positive): "
        + ", ".join(
            f"T = {s['temperature']:g}, w = {s['w']:g}: {_pct(s['1'])} / {_pct(s['5'])}" for s in sel["by"]
        )
        + f". Chosen: **T = {ch['temperature']:g}, w = {ch['w']:g}** (the highest worse share).",
        "",
        f"That setting on {conf['n']} new seeds per rating (from {conf['seed']:,}; used by no choice): "
        f"**{_pct(one['share_as_conditioned'])}** of the one-star samples judged negative, "
        f"**{_pct(five['share_as_conditioned'])}** of the five-star ones positive (the model's own mean "
        f"P(r\\*): {one['own_posterior_mean']:.2f} / {five['own_posterior_mean']:.2f}; mean length "
        f"{one['mean_chars']:.0f} / {five['mean_chars']:.0f} chars; by category, one star: "
        + ", ".join(f"{k} {_pct(x)}" for k, x in one["by_category"].items())
        + ").",
        "",
        "First three of each:",
        "",
        *[f"> {r} star(s): {t}" for r in ("1", "5") for t in conf["by_rating"][r]["first"]],
        "",
        f"Regenerate: `.venv/bin/python -m bench.conditioning --out DIR --stage guided --confirm --guidance "
        f"{' '.join(f'{w:g}' for w in c['weights'])} --guidance-temperatures "
        f"{' '.join(f'{t:g}' for t in c['temperatures'])}` ({c['wall_s'] / 60:.1f} min here).",
    ]


def fit_judge(rated_train: list[tuple[str, str, Any]]) -> tuple[Any, int]:
    """The independent judge: TF-IDF + LR, positive (4-5) vs negative (1-2), class-balanced, fit on the
    real training reviews only (rows (text, rating, category))."""
    from raylstm.classify import binary_of, tfidf_classifier

    rows = [(t, binary_of(r)) for t, r, _ in rated_train if binary_of(r)]
    return tfidf_classifier([t for t, _ in rows], [b for _, b in rows], balanced=True), len(rows)


def guided_stage(
    out_dir: Path, weights: list[float], temperatures: list[float], quick: bool = False, confirm: bool = False
) -> dict:
    """The guided figures on the conditioned run of `out_dir` (its eval stage's figures.json must exist),
    added to figures.json as "guided"."""
    import torch

    from raylstm.checkpoint import load_checkpoint
    from raylstm.data import load_splits
    from raylstm.ray_env import ensure_ray
    from raylstm.sample import Sampler

    torch.set_num_threads(2)
    base, _ = out_paths(out_dir)
    figures = json.loads((base / "figures.json").read_text())
    run = json.loads((base / "run-conditioned.json").read_text())
    ensure_ray(num_cpus=4, include_dashboard=False)
    ckpt = load_checkpoint(run["run_dir"])
    train = split_rows_with_conditions(load_splits(ckpt.config.data).train)
    judge, n_judge = fit_judge([r for r in train if r[1]])
    measure = confirm_figures if confirm else guided_figures
    g = measure(
        Sampler.load(ckpt), judge, list(ckpt.conditions.values["category"]), weights, temperatures, quick
    )
    g["checkpoint"] = str(ckpt.path)
    g["judge_train_reviews"] = n_judge
    figures["guided_confirm" if confirm else "guided"] = g
    (base / "figures.json").write_text(json.dumps(figures, indent=2))
    return figures


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def guided_markdown(g: dict[str, Any]) -> list[str]:
    sel = g["select"]
    chosen = f"{g['chosen_w']:g}"
    lines = [
        "",
        "### With Bayes-rule guidance (`raylstm sample --guidance W`)",
        "",
        "The conditioned model is its own classifier: each next character x is scored "
        "`log P(x | prefix, r*) + w log P(r* | prefix + x)`, the posterior by Bayes' rule over the five "
        "ratings read in parallel (raylstm/guidance.py; docs/conditioning.md). w = 0 is the plain sampler.",
        "",
        f"w chosen on a separate set ({sel['n']} per rating, T = {sel['temperature']}, seeds from "
        f"{sel['seed']:,}; the judge's shares, 1 star negative / 5 stars positive): "
        + ", ".join(f"w = {w}: {_pct(s['1'])} / {_pct(s['5'])}" for w, s in sel["by_w"].items())
        + f". Chosen: **w = {chosen}** (the highest worse share).",
        "",
        f"On the unguided figure's own seeds ({g['n']} per rating; the chosen w's row is a fixed w on "
        "fresh seeds, the other rows are the sweep):",
        "",
        "| T | w | 1 star -> negative | 5 stars -> positive | model's own P(r\\*) 1 / 5 | mean length 1 / 5 | "
        "model rows per char | chars/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for T, sweep in g["sweep"].items():
        for w, row in sweep.items():
            one, five = row["1"], row["5"]
            mark = "**" if w == chosen else ""
            cps = (one["chars"] + five["chars"]) / (one["wall_s"] + five["wall_s"])
            lines.append(
                f"| {T} | {mark}{w}{mark} | {mark}{_pct(one['share_as_conditioned'])}{mark} | "
                f"{mark}{_pct(five['share_as_conditioned'])}{mark} | {one['own_posterior_mean']:.2f} / "
                f"{five['own_posterior_mean']:.2f} | {one['mean_chars']:.0f} / {five['mean_chars']:.0f} | "
                f"{one['rows_per_char']:.2f} | {cps:,.0f} |"
            )
    for T, sweep in g["sweep"].items():
        z = sweep.get("0")
        if z and "plain_equal" in z["1"]:
            plain_cps = (z["1"]["chars"] + z["5"]["chars"]) / (
                z["1"]["plain_wall_s"] + z["5"]["plain_wall_s"]
            )
            lines += [
                "",
                f"T = {T}, w = 0 against the plain sampler on the same seeds: {z['1']['plain_equal']} / "
                f"{z['1']['n']} one-star and {z['5']['plain_equal']} / {z['5']['n']} five-star texts "
                f"identical (plain: {plain_cps:,.0f} chars/s).",
            ]
    best = g["sweep"].get(f"{SAMPLE_TEMPERATURE:g}", {}).get(chosen)
    if best:
        lines += [
            "",
            f"By category at w = {chosen}, T = {SAMPLE_TEMPERATURE}: "
            + "; ".join(
                f"{r} star(s): " + ", ".join(f"{c} {_pct(x)}" for c, x in best[r]["by_category"].items())
                for r in ("1", "5")
            )
            + ".",
        ]
    lines += ["", f"Guided samples ({SHOW_CATEGORY}, T = {SAMPLE_TEMPERATURE}, w = {chosen}):", ""]
    for r, texts in g["shown_samples"].items():
        lines += [f"{r} star(s):", ""] + [f"> {t}" for t in texts] + [""]
    lines.append(
        f"Regenerate: `.venv/bin/python -m bench.conditioning --out DIR --stage guided --guidance "
        f"{' '.join(f'{w:g}' for w in g['weights'])} --guidance-temperatures "
        f"{' '.join(f'{t:g}' for t in g['temperatures'])}` ({g['wall_s'] / 60:.1f} min here)."
    )
    return lines
