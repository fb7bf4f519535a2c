"""Bayes-rule guidance (raylstm.guidance): with weight 0 it is the plain conditioned sampler, seed for
seed; one guided step's distribution is the formula computed by hand from the model's logits under every
rating; its running posterior is classify.posterior's of the text it wrote; and guidance raises the
model's own posterior of the asked-for rating. A small conditioned model (conditioned_support), no Ray."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conditioned_support import conditioned_checkpoint

from raylstm.classify import posterior
from raylstm.guidance import generate_guided, start_guided
from raylstm.sample import SampleParamError, SampleParams, Sampler

ASKS = [
    {"rating": 1, "category": "guitars"},
    {"rating": 5, "category": "books"},
    {"rating": 5, "category": "guitars"},
    {"rating": 1},  # category missing: summed over every category, the row's own ids read too
]


def test_guidance_zero_is_the_plain_conditioned_sampler_seed_for_seed(conditioned_model):
    model, vocab, conds, cfg = conditioned_model
    sampler = Sampler(model, vocab, cfg.data, conditions=conds)
    params = [
        SampleParams(temperature=t, top_p=p, max_chars=60, seed=s, conditions=a, stop=stop)
        for s, (a, t, p, stop) in enumerate(
            zip(ASKS, (0.9, 1.2, 0.0, 0.7), (1.0, 0.9, 1.0, 1.0), (("\n",), (), ("\n",), ()))
        )
    ]
    prompts = ["\n", "The ", "\n", "The guitar is "]
    plain = [g[0].text for g in sampler.generate(prompts, params)]
    guided = [g[0].text for g in generate_guided(sampler, prompts, params, 0.0)]
    assert guided == plain
    # n rows per prompt take seeds seed+0.., as Sampler.generate's do.
    many = generate_guided(sampler, ["\n"], [params[0]], 0.0, n=3)[0]
    assert [c.text for c in many] == [c.text for c in sampler.generate(["\n"], [params[0]], n=3)[0]]
    strong = [g[0].text for g in generate_guided(sampler, prompts, params, 4.0)]
    assert strong != guided  # the weight matters to what is written


def hand_guided(model, vocab, conds, text_ids: list[int], rating: int, category: str, w: float) -> np.ndarray:
    """The next character's guided distribution, written out: for every rating r, the model read over the
    prefix with ids (r, category); log P(r | prefix) from the training counts (add-one) and the prefix's
    characters after the first; then log P(x | r*) + w * log P(r* | prefix + x), renormalised."""
    cat = conds.ids["category"][category]
    ids = torch.tensor([text_ids])
    log_post, nxt = [], []
    with torch.inference_mode():
        for r in range(1, 6):
            logits, _ = model(ids, None, torch.tensor([[r, cat]]))
            lp = torch.log_softmax(logits[0].double(), dim=-1)
            ll = sum(float(lp[t, text_ids[t + 1]]) for t in range(len(text_ids) - 1))
            prior = conds.joint_counts.get((str(r), category), 0) + 1.0
            log_post.append(math.log(prior) + ll)
            nxt.append(lp[-1].numpy())
    log_post = np.array(log_post)
    log_post -= np.logaddexp.reduce(log_post)
    nxt = np.stack(nxt)  # [5, V]
    after = log_post[:, None] + nxt
    term = after[rating - 1] - np.logaddexp.reduce(after, axis=0)
    g = nxt[rating - 1] + w * term
    g[vocab.unk_id] = -np.inf
    return np.exp(g - np.logaddexp.reduce(g))


def test_one_guided_step_is_the_formula_computed_by_hand(conditioned_model):
    model, vocab, conds, cfg = conditioned_model
    sampler = Sampler(model, vocab, cfg.data, conditions=conds)
    for rating, category, w, prompt in ((1, "guitars", 2.0, "\nThe guitar is "), (5, "books", 0.7, "\n")):
        params = SampleParams(temperature=0, max_chars=5, conditions={"rating": rating, "category": category})
        batch = start_guided(sampler, [prompt], [params], w)
        ids = list(batch.rows[0].prompt.ids)
        n_prompt = len(ids)
        for _ in range(3):  # the first step, and two after greedy characters (the update of the joint)
            got = torch.softmax(batch.scores(), dim=-1)[0].numpy()
            want = hand_guided(model, vocab, conds, ids, rating, category, w)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
            batch.step()
            ids = ids + [vocab.stoi[batch.rows[0].text[-1]]]
        assert batch.row_steps == 5 * (n_prompt + 3)  # 5 model rows, one step per char


def log_posterior_of_target(model, vocab, conds, texts, asks) -> np.ndarray:
    """log P(asked rating | text) by classify.posterior (whole reviews, the category known)."""
    post = posterior(model, vocab, conds, texts, "rating", {"category": [a["category"] for a in asks]})
    idx = [post.values.index(str(a["rating"])) for a in asks]
    return np.log(np.maximum(post.probs[np.arange(len(texts)), idx], 1e-300))


def test_guidance_raises_the_models_posterior_of_the_asked_rating(conditioned_model):
    model, vocab, conds, cfg = conditioned_model
    sampler = Sampler(model, vocab, cfg.data, conditions=conds)
    asks = [{"rating": r, "category": c} for r in (1, 5) for c in ("guitars", "books")] * 4
    params = [
        SampleParams(temperature=1.5, max_chars=120, stop=("\n",), seed=100 + i, conditions=a)
        for i, a in enumerate(asks)
    ]
    means = {}
    for w in (0.0, 3.0):
        batch = start_guided(sampler, ["\n"] * len(asks), params, w).run()
        texts = [r.text for r in batch.rows]
        ref = log_posterior_of_target(model, vocab, conds, texts, asks)
        means[w] = float(ref.mean())
        # The sampler's running posterior is classify's of the finished review (stopped at its "\n").
        done = [i for i, r in enumerate(batch.rows) if r.finish_reason == "stop"]
        assert len(done) >= len(asks) // 2
        own = batch.posterior()
        np.testing.assert_allclose(
            own.probs[done], posterior(model, vocab, conds, [texts[i] for i in done], "rating",
                                       {"category": [asks[i]["category"] for i in done]}).probs,
            atol=1e-4,
        )  # fmt: skip
    assert means[3.0] > means[0.0], means


def test_guidance_refuses_what_it_cannot_do_and_the_cli_prints_it(conditioned_model, tmp_path, capsys):
    from raylstm.cli import main

    model, vocab, conds, cfg = conditioned_model
    sampler = Sampler(model, vocab, cfg.data, conditions=conds)
    for params, w, msg in (
        (SampleParams(conditions={"category": "books"}), 1.0, "needs a rating"),
        (SampleParams(conditions={"rating": 1}, presence_penalty=1.0), 1.0, "penalties"),
        (SampleParams(conditions={"rating": 1}), -1.0, "must be a number"),
    ):
        with pytest.raises(SampleParamError, match=msg) as e:
            generate_guided(sampler, ["\n"], [params], w)
        assert e.value.field == "guidance"

    run = conditioned_checkpoint(tmp_path / "run")
    want = generate_guided(
        Sampler.load(run), ["The "],
        [SampleParams(temperature=0.8, max_chars=50, seed=4, conditions={"rating": 1, "category": "books"})], 2.0,
    )[0][0].text  # fmt: skip
    args = ["sample", "--checkpoint", str(run), "--prime", "The ", "--temperature", "0.8", "--length", "50"]
    args += ["--seed", "4", "--rating", "1", "--category", "books", "--guidance", "2"]
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[1] == "The " + want.split("\n")[0]
    assert main([*args[:-6], "--category", "books", "--guidance", "2"]) == 2  # no rating to guide toward
    assert "guidance needs a rating" in capsys.readouterr().err
