"""The figures of bench.conditioning from its two runs (see that module): held-out rating and category by
Bayes' rule beside the majority class and TF-IDF + LR, conditioned samples judged by an independent
classifier, the sentiment probe and unit, steering. Writes conditioning/figures.json."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from bench.conditioning import AMAZON, CONFIG, MI_CSV, ROOT, RUNS, out_paths

SAMPLES_PER_RATING = 200
SAMPLE_TEMPERATURE = 0.8  # documented beside the figure: lower is more on-message, higher more varied
ALSO_TEMPERATURE = 0.5  # the same count again at a lower temperature, reported beside it
SAMPLE_CHARS = 400
SHOW_CATEGORY = "Musical Instruments"
MAX_CATEGORY_REVIEWS = 600  # category by Bayes' rule costs 5 x categories passes: every k-th test review


def split_rows_with_source(ds: Any) -> list[tuple[str, str | None, str | None, str]]:
    """(text, rating "1".."5" or None, category, source file) of a split, in key order."""
    from raylstm.conditions import rating_value
    from raylstm.evaluate import split_rows

    return [(r[1], rating_value(r[3]), r[4], r[2]) for r in split_rows(ds, ("rating", "category"))]


def heldout_bpc(cond_ckpt: Any, plain_ckpt: Any, test: list[tuple]) -> dict[str, Any]:
    """Both models on the same held-out reviews: the conditioned one reads each with its own rating and
    category (-log2 P(text | rating, category)), the unconditioned one -log2 P(text). On the whole test
    split (MI + Blitzer: the target's figure) and on its Musical Instruments reviews alone (cpu-quality's
    held-out text)."""
    from raylstm.evaluate import score_reviews

    conds = cond_ckpt.conditions
    out: dict[str, Any] = {}
    mi = [r for r in test if Path(r[3]).name == MI_CSV.name]
    sets = ([("all_test", list(test))] if len(mi) < len(test) else []) + [("mi_test", mi)]
    for name, rows in sets:
        texts = [r[0] for r in rows]
        cond = conds.encode_rows({"rating": [r[1] for r in rows], "category": [r[2] for r in rows]})
        c_bits, chars, c_unk = score_reviews(cond_ckpt.model, cond_ckpt.vocab, texts, conditions=cond)
        out[name] = {
            "reviews": len(rows),
            "chars": chars,
            "conditioned_bpc": c_bits / chars,
            "unconditioned_bpc": None,
            "difference": None,
            "unknown_chars": {"conditioned": c_unk},
            "rated": sum(r[1] is not None for r in rows),
        }
        if plain_ckpt is not None:
            p_bits, p_chars, p_unk = score_reviews(plain_ckpt.model, plain_ckpt.vocab, texts)
            out[name].update(unconditioned_bpc=p_bits / p_chars, difference=c_bits / chars - p_bits / p_chars)
            out[name]["unknown_chars"]["unconditioned"] = p_unk
    return out


def split_rows_with_conditions(ds: Any) -> list[tuple[str, str | None, str | None]]:
    """(text, rating "1".."5" or None, category) of a split, in key order."""
    from raylstm.conditions import rating_value
    from raylstm.evaluate import split_rows

    return [(r[1], rating_value(r[3]), r[4]) for r in split_rows(ds, ("rating", "category"))]


def conditioned_samples(
    sampler: Any,
    rating: int,
    categories: list[str],
    n: int,
    seed: int,
    temperature: float = SAMPLE_TEMPERATURE,
) -> list[str]:
    """n reviews at `rating`, the categories taken in turn; each from "\\n" (a review's start) to its "\\n"."""
    from raylstm.sample import SampleParams

    prompts, params = [], []
    for i in range(n):
        cond = {"rating": rating, "category": categories[i % len(categories)]}
        params.append(
            SampleParams(
                temperature=temperature, max_chars=SAMPLE_CHARS, stop=("\n",), seed=seed + i,
                conditions=cond,
            )
        )  # fmt: skip
        prompts.append("\n")
    return [g[0].text for g in sampler.generate(prompts, params)]


def steered_samples(sampler: Any, strength: float | None, n: int, seed: int) -> list[str]:
    from raylstm.sample import SampleParams

    params = [
        SampleParams(
            temperature=SAMPLE_TEMPERATURE, max_chars=SAMPLE_CHARS, stop=("\n",), seed=seed + i,
            steer_sentiment=strength,
        )
        for i in range(n)
    ]  # fmt: skip
    return [g[0].text for g in sampler.generate(["\n"] * n, params)]


def sampler_takes_conditions() -> bool:
    """Whether this tree's sampler takes conditions and steering (the serving rewrite lands them)."""
    from raylstm.sample import SampleParams

    return {"conditions", "steer_sentiment"} <= set(SampleParams.__dataclass_fields__)


def probe_figures(
    figures: dict[str, Any], models: list[tuple[str, Any]], sets: list[Any], base: Path
) -> None:
    """The probe and the sentiment unit on each of `models` (each read without conditions)."""
    from raylstm.classify import sentiment_report

    probe = figures.setdefault("probe", {})
    for name, ckpt in models:
        report, unit = sentiment_report(ckpt, sets)
        probe[name] = report
        report["unit_file"] = str(unit.save(base / f"sentiment-unit-{name}.json"))


def eval_stage(
    out_dir: Path,
    quick: bool = False,
    deadline: float | None = None,
    guidance: list[float] | None = None,
    guidance_temperatures: list[float] | None = None,
) -> dict[str, Any]:
    """The figures from run-conditioned.json and run-unconditioned.json in `out_dir` (the train stage's);
    without the unconditioned run, its figures are left out and the probe and steering use the
    conditioned model. The parts run most important first, each saved to figures.json when done; with a
    `deadline` (epoch seconds), the parts not started by then are skipped and named in the figures.
    `guidance` (weights) adds bench.conditioning_guided's figures, last."""
    import numpy as np
    import torch

    from raylstm.checkpoint import load_checkpoint
    from raylstm.classify import (
        binary_of,
        heldout_category_report,
        heldout_rating_report,
        labelled_sets,
    )
    from raylstm.data import load_splits
    from raylstm.ray_env import ensure_ray
    from raylstm.sample import Sampler

    torch.set_num_threads(2)
    base, _ = out_paths(out_dir)
    runs = {
        name: json.loads((base / f"run-{name}.json").read_text())
        for name in RUNS
        if (base / f"run-{name}.json").exists()
    }
    t0 = time.perf_counter()
    ensure_ray(num_cpus=4, include_dashboard=False)
    cond_ckpt = load_checkpoint(runs["conditioned"]["run_dir"])
    plain_ckpt = load_checkpoint(runs["unconditioned"]["run_dir"]) if "unconditioned" in runs else None
    splits = load_splits(cond_ckpt.config.data)
    train = split_rows_with_conditions(splits.train)
    test_src = split_rows_with_source(splits.test)
    if quick:
        test_src = test_src[::10]
    test = [r[:3] for r in test_src]
    figures: dict[str, Any] = {"runs": runs, "skipped_at_deadline": []}

    def save() -> None:  # after every part: a run cut short by its deadline still reports what it has
        figures["eval_s"] = time.perf_counter() - t0
        (base / "figures.json").write_text(json.dumps(figures, indent=2))

    def part(name: str) -> bool:
        """Whether to run part `name` (False once past the deadline: then it is named as skipped)."""
        if deadline is not None and time.time() > deadline:
            figures["skipped_at_deadline"].append(name)
            save()
            return False
        figures.setdefault("part_s", {})
        figures["part_s"][name] = time.perf_counter()  # the start; replaced by the duration when done
        return True

    def done(name: str) -> None:
        figures["part_s"][name] = time.perf_counter() - figures["part_s"][name]
        save()

    part("heldout")
    figures["heldout"] = heldout_bpc(cond_ckpt, plain_ckpt, test_src)
    figures["matched_val"] = matched_val(runs)
    figures["heldout_s"] = time.perf_counter() - t0
    done("heldout")

    rated_train = [r for r in train if r[1]]
    rated_test = [r for r in test if r[1]]
    # The independent judge: TF-IDF + LR, positive (4-5) vs negative (1-2), fit on real training reviews.
    from bench.conditioning_guided import fit_judge

    judge, n_judged = fit_judge(rated_train)
    sampler = Sampler.load(cond_ckpt)
    categories = list(cond_ckpt.conditions.values["category"])
    n = 20 if quick else SAMPLES_PER_RATING

    def judged_at(temperature: float) -> dict[str, Any]:
        out = {}
        for rating, want in ((1, "negative"), (5, "positive")):
            texts = conditioned_samples(sampler, rating, categories, n, 1000 * rating, temperature)
            verdict = judge.predict(texts).tolist()
            cats = [categories[i % len(categories)] for i in range(n)]  # as conditioned_samples takes them
            out[str(rating)] = {
                "n": n,
                "share_as_conditioned": sum(v == want for v in verdict) / n,
                "want": want,
                "mean_chars": sum(map(len, texts)) / n,
                "first": texts[:3],
                "by_category": {
                    c: sum(v == want for v, k in zip(verdict, cats) if k == c) / cats.count(c)
                    for c in categories
                    if c in cats
                },
            }
        return out

    if part("samples_judged"):
        # How far the judge itself can be trusted: its accuracy on the real held-out reviews (1-2 vs 4-5).
        real = [(t, binary_of(r)) for t, r, _ in rated_test if binary_of(r)]
        pred = judge.predict([t for t, _ in real])
        judge_acc = {
            b: float(np.mean([p == b for p, (_, bb) in zip(pred, real) if bb == b]))
            for b in ("negative", "positive")
        }
        figures["samples_judged"] = {
            "temperature": SAMPLE_TEMPERATURE,
            "max_chars": SAMPLE_CHARS,
            "categories": categories,
            "judge_train_reviews": n_judged,
            "judge_recall_on_real_test": judge_acc,
            "by_rating": judged_at(SAMPLE_TEMPERATURE),
        }
        figures["shown_samples"] = {
            str(r): conditioned_samples(sampler, r, [SHOW_CATEGORY], 3, seed=77) for r in (1, 3, 5)
        }
        done("samples_judged")

    if part("rating"):
        t1 = time.perf_counter()
        figures["rating"] = heldout_rating_report(cond_ckpt, rated_train, rated_test)
        figures["classify_s"] = time.perf_counter() - t1
        done("rating")

    steer_name = "unconditioned" if plain_ckpt is not None else "conditioned"
    steer_ckpt = plain_ckpt or cond_ckpt
    sets = None
    if part(f"probe_{steer_name}"):
        sets = labelled_sets(AMAZON, cond_ckpt.config.data)
        if quick:
            for s in sets:
                s.train_texts, s.train_labels = s.train_texts[::8], s.train_labels[::8]
        probe_figures(figures, [(steer_name, steer_ckpt)], sets, base)
        done(f"probe_{steer_name}")

    if sets is not None and part("steering"):
        steer = Sampler.load(steer_ckpt, sentiment_unit=base / f"sentiment-unit-{steer_name}.json")
        steering: dict[str, Any] = {"model": steer_name}
        for strength, want in ((1.0, "positive"), (-1.0, "negative")):
            texts = steered_samples(steer, strength, 10 if quick else 100, seed=5000)
            verdict = judge.predict(texts).tolist()
            steering[f"{strength:+g}"] = {
                "n": len(texts),
                "share": sum(v == want for v in verdict) / len(texts),
                "want": want,
                "first": texts[:2],
            }
        unsteered = steered_samples(steer, None, 10 if quick else 100, seed=5000)
        steering["none"] = {
            "n": len(unsteered),
            "share_positive": sum(v == "positive" for v in judge.predict(unsteered).tolist())
            / len(unsteered),
        }
        figures["steering"] = steering
        done("steering")

    # Beyond the figures: the same at a lower temperature, the category read back, the probe on
    # the conditioned model.
    if "samples_judged" in figures and part("samples_judged_also"):
        figures["samples_judged"]["also"] = {
            "temperature": ALSO_TEMPERATURE,
            "by_rating": judged_at(ALSO_TEMPERATURE),
        }
        done("samples_judged_also")

    cat_values = cond_ckpt.conditions.values.get("category", [])
    if len(cat_values) > 1 and part("category"):  # one category has nothing to read back
        known = [r for r in test if r[2] in cond_ckpt.conditions.ids["category"]]
        every = max(1, -(-len(known) // MAX_CATEGORY_REVIEWS))  # every k-th test review, k = ceil(n / max)
        figures["category"] = heldout_category_report(cond_ckpt, train, known[::every])
        done("category")

    if plain_ckpt is not None and sets is not None and part("probe_conditioned"):
        probe_figures(figures, [("conditioned", cond_ckpt)], sets, base)
        done("probe_conditioned")

    if guidance and part("guided"):
        from bench.conditioning_guided import TEMPERATURES, guided_figures

        temps = list(guidance_temperatures or TEMPERATURES)
        figures["guided"] = guided_figures(sampler, judge, categories, list(guidance), temps, quick)
        figures["guided"].update(checkpoint=str(cond_ckpt.path), judge_train_reviews=n_judged)
        done("guided")
    return figures


def matched_val(runs: dict[str, Any]) -> dict[str, Any] | None:
    """The in-loop validation bpc (the whole val split, MI + Blitzer, the conditioned model with each
    review's conditions) of both runs at the conditioned run's best step: with the same preset and schedule
    (max_steps), the two are the same model at the same point, conditions or not."""
    from raylstm.train import read_metrics

    if "unconditioned" not in runs:
        return None
    val = {}
    for name in ("conditioned", "unconditioned"):
        d = Path(runs[name]["run_dir"])
        val[name] = {
            int(m["step"]): float(m["val_bpc"]) for m in read_metrics(d) if m.get("val_bpc") is not None
        }
    both = sorted(set(val["conditioned"]) & set(val["unconditioned"]))
    if not both:
        return None
    best = json.loads((Path(runs["conditioned"]["run_dir"]) / "best.json").read_text())
    step = int(best["metrics"]["step"]) if int(best["metrics"]["step"]) in both else both[-1]
    return {
        "step": step,
        "conditioned_val_bpc": val["conditioned"][step],
        "unconditioned_val_bpc": val["unconditioned"][step],
        "difference": val["conditioned"][step] - val["unconditioned"][step],
        "curve": {k: [val["conditioned"][k], val["unconditioned"][k]] for k in both},
    }


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def to_markdown(f: dict[str, Any], command: str) -> str:
    runs = f["runs"]
    c = runs["conditioned"]
    u = runs.get("unconditioned") or {
        "config": str(Path(CONFIG).relative_to(ROOT)),
        "overrides": ["(not run)"],
    }
    sj = f.get("samples_judged")
    lines = [
        "## Conditioning: a review of a given rating and category, and the rating read back",
        "",
        f"`{Path(CONFIG).relative_to(ROOT)}` (cpu-quality's model and schedule, rating and category "
        f"conditions) on {', '.join(Path(s).name for s in c['sources'])}; the unconditioned model is the "
        "same preset without conditions, trained by the same command. 2 cores, one run at a time; "
        "budget: 20 min from Ray start to the best checkpoint.",
        "",
        "| model | run | steps | Ray start to best checkpoint | process wall | best val bpc |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, r in (("conditioned (rating, category)", c), ("unconditioned", u)):
        if "steps" not in r:
            continue
        wall = f"{r['wall_s'] / 60:.1f} min" if r.get("wall_s") else "-"
        best = f"{r['ray_start_to_best_s'] / 60:.1f} min" if r.get("ray_start_to_best_s") else "-"
        sets = " ".join(f"--set '{o}'" for o in r["overrides"])
        lines.append(
            f"| {name} | `{r['config']}` {sets} | {r['steps']:,} | {best} | {wall} | {r['best_val_bpc']:.4f} |"
        )
    if c.get("stopped_at_deadline"):
        lines += [
            "",
            f"The conditioned run was stopped at the CPU lock's deadline at step {c['steps']:,} (the same LR "
            f"schedule as the unconditioned run's, so the two are comparable step for step); its model "
            f"is the best checkpoint so far, step {c['best_step']:,}"
            + (f", {c['wall_s'] / 60:.1f} min after the run started." if c.get("wall_s") else "."),
        ]
    h = f["heldout"]
    lines += [
        "",
        "Held-out bpc, both models on the same reviews (the conditioned model reads each with its own "
        "rating and category: -log2 P(text | rating, category) per char):",
        "",
        "| held-out text | reviews | chars | conditioned | unconditioned | difference |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, title in (
        ("all_test", "whole test split (MI + Blitzer)"),
        ("mi_test", "its Musical Instruments reviews"),
    ):
        if key not in h:
            continue
        x = h[key]
        un = "not measured" if x["unconditioned_bpc"] is None else f"{x['unconditioned_bpc']:.4f}"
        diff = "" if x["difference"] is None else f"**{x['difference']:+.4f}**"
        lines.append(
            f"| {title} | {x['reviews']:,} | {x['chars']:,} | {x['conditioned_bpc']:.4f} | {un} | {diff} |"
        )
    mv = f.get("matched_val")
    if mv:
        lines += [
            "",
            f"At the same step of the same schedule ({mv['step']:,}; in-loop validation on every val review): "
            f"conditioned {mv['conditioned_val_bpc']:.4f}, unconditioned {mv['unconditioned_val_bpc']:.4f}, "
            f"difference **{mv['difference']:+.4f}** bpc.",
        ]
    lines += ["", "Target: the conditioned model no worse than +0.02 bpc above the unconditioned one."]
    if sj:
        lines += [
            "",
            f"### Generated reviews obey the condition ({sj['by_rating']['1']['n']} per rating, T = "
            f"{sj['temperature']}, one review each, categories in turn)",
            "",
            f"Judge: TF-IDF (word 1-2-grams) + logistic regression, class-balanced, fit on the "
            f"{sj['judge_train_reviews']:,} real training reviews rated 1-2 or 4-5 (none generated).",
            "",
            f"| condition | judged as conditioned | mean length | at T = {ALSO_TEMPERATURE} |",
            "|---|---:|---:|---:|",
        ]
        for r, s in sj["by_rating"].items():
            also = sj.get("also", {}).get("by_rating", {}).get(r)
            lines.append(
                f"| {r} star(s) -> {s['want']} | **{_pct(s['share_as_conditioned'])}** | "
                f"{s['mean_chars']:.0f} chars | {_pct(also['share_as_conditioned']) if also else 'not run'} |"
            )
        jr = sj["judge_recall_on_real_test"]
        lines += [
            "",
            f"The judge on the real held-out reviews: {_pct(jr['negative'])} of the 1-2 star ones called "
            f"negative, {_pct(jr['positive'])} of the 4-5 star ones positive.",
            "",
            "By category (share judged as conditioned, T = "
            f"{sj['temperature']}): "
            + "; ".join(
                f"{r} star(s): " + ", ".join(f"{c} {_pct(x)}" for c, x in s["by_category"].items())
                for r, s in sj["by_rating"].items()
                if "by_category" in s
            )
            + ".",
        ]
    else:
        lines += ["", "Conditioned samples: not measured (skipped at the eval stage's deadline)."]
    if f.get("guided"):
        from bench.conditioning_guided import guided_markdown

        lines += guided_markdown(f["guided"])
    if f.get("guided_confirm"):
        from bench.conditioning_guided import confirm_markdown

        lines += confirm_markdown(f["guided_confirm"])
    if "rating" not in f:
        lines += ["", "(The eval stage ended here.)"]
        return _finish(lines, f, command)
    lines += ["", "### Held-out rating by Bayes' rule (the review's category known)", ""]
    for key, title in (("five_way", "5-way (1-5 stars)"), ("binary", "positive (4-5) vs negative (1-2)")):
        rr = f["rating"][key]
        lines += [
            f"{title}, {rr['bayes']['n']:,} test reviews:",
            "",
            "| method | accuracy | macro-F1 |",
            "|---|---:|---:|",
            f"| Bayes' rule on the conditioned model | **{_pct(rr['bayes']['accuracy'])}** | **{rr['bayes']['macro_f1']:.3f}** |",
            f"| majority class ({rr['majority']['class']}) | {_pct(rr['majority']['accuracy'])} | {rr['majority']['macro_f1']:.3f} |",
            f"| TF-IDF + LR (training split) | {_pct(rr['tfidf_lr']['accuracy'])} | {rr['tfidf_lr']['macro_f1']:.3f} |",
            "",
        ]
    cat = f.get("category", {})
    if "bayes" in cat:
        lines.append(
            f"Category by Bayes' rule (summed over ratings), {cat['bayes']['n']:,} test reviews: accuracy "
            f"**{_pct(cat['bayes']['accuracy'])}**, macro-F1 {cat['bayes']['macro_f1']:.3f} (majority "
            f'"{cat["majority"]["class"]}": {_pct(cat["majority"]["accuracy"])}).'
        )
    elif "single_category" in cat:
        lines.append(
            f'Category: every training review is "{cat["single_category"]}" (one source), so there is no '
            "category to read back."
        )
    lines.append(f"Classification time: {f['classify_s']:.0f} s.")
    if "probe" not in f:
        lines += ["", "(The eval stage ended here.)"]
        return _finish(lines, f, command)
    lines += [
        "",
        "### Sentiment probe and unit (Radford et al.), on held-out labels",
        "",
        "Linear probe: standardised [h ; c] of the top layer after the review -> logistic regression (C by "
        "3-fold CV on the training part). Unit: the single feature with the best threshold on the Blitzer "
        "training part, applied as is to both sets.",
        "",
        "| model | set | train / test | probe | single unit | TF-IDF + LR |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for model, rep in f["probe"].items():
        for name, s in rep["sets"].items():
            lines.append(
                f"| {model} | {name} | {s['train']:,} / {s['test']:,} | **{_pct(s['probe_accuracy'])}** | "
                f"{_pct(s['unit_accuracy'])} | {_pct(s['tfidf_accuracy'])} |"
            )
    st = f.get("steering") or {}
    which = st.get("model") or next(iter(f["probe"]))
    unit = f["probe"][which]["unit"]
    lines += [
        "",
        f"The {which} model's sentiment unit (read without conditions): {unit['state']}[{unit['unit']}] of "
        f"layer {unit['layer']} (positive mean {unit['positive_mean']:.3f}, negative "
        f"{unit['negative_mean']:.3f}).",
    ]
    if st:
        lines[-1] += (
            f" Steering it (`raylstm sample --steer-sentiment +1/-1`), {st['+1']['n']} samples each, same "
            f"judge: +1 -> positive {_pct(st['+1']['share'])}, -1 -> negative {_pct(st['-1']['share'])}; "
            f"unsteered: {_pct(st['none']['share_positive'])} positive."
        )
        lines += ["", "Steered samples (the first of each):", ""]
        lines += [f"> {st[k]['first'][0]} ({k})" for k in ("+1", "-1") if st[k]["first"]]
    return _finish(lines, f, command)


def _finish(lines: list[str], f: dict[str, Any], command: str) -> str:
    if f.get("shown_samples"):
        lines += ["", f"### Samples ({SHOW_CATEGORY}, T = {SAMPLE_TEMPERATURE})", ""]
    for r, texts in f.get("shown_samples", {}).items():
        lines.append(f"{r} star(s):")
        lines.append("")
        lines += [f"> {t}" for t in texts]
        lines.append("")
    if f.get("skipped_at_deadline"):
        lines += [f"Skipped at the eval stage's deadline: {', '.join(f['skipped_at_deadline'])}.", ""]
    steps = [
        o.split("=", 1)[1] for o in f["runs"]["conditioned"]["overrides"] if o.startswith("train.max_steps=")
    ]
    args = f" --steps {steps[0]}" if steps and "--quick" not in command else ""
    lines += [
        f"Rerun: `{command} --out DIR{args}` (both runs, then the figures; one piece at a time: "
        f"`--stage train --run unconditioned{args}`, `--stage train --run conditioned{args}`, `--stage eval`).",
        "",
    ]
    return "\n".join(lines)
