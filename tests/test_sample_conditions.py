"""Generation on request: the sampler reads each row's rating and category (and, when asked, the fixed
sentiment unit) at every step, exactly as a plain decode loop over the model does, whatever else is in
the batch; unknown values are refused naming the field; `raylstm sample --rating/--category/--steer-sentiment`
prints what the library generates. A small conditioned model (conditioned_support), no Ray."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conditioned_support import BAD, GOOD, conditioned_checkpoint

from raylstm.classify import SentimentUnit, steered_forward
from raylstm.sample import SampleParamError, SampleParams, Sampler

UNIT = SentimentUnit(
    index=3, state="h", unit=3, layer=0, sign=1, threshold=0.0,
    positive_mean=0.4, negative_mean=-0.4, train_accuracy=1.0,
)  # fmt: skip


def reference_greedy(model, vocab, prompt: str, cond: list[int], n: int, steer: float | None = None) -> str:
    """Argmax decoding written as a plain loop over the model: the prompt, then one char at a time, each
    read with the same condition ids (and the unit fixed at `steer`); the unknown id never comes out."""
    ids = torch.as_tensor(vocab.encode(prompt), dtype=torch.long)[None]
    c = torch.tensor([cond])
    out, state = "", None
    with torch.inference_mode():
        for _ in range(n):
            if steer is None:
                logits, state = model(ids, state, c)
            else:
                logits, state = steered_forward(model, ids, state, UNIT, torch.tensor([steer]), c)
            z = logits[0, -1].double()
            z[vocab.unk_id] = -math.inf
            nxt = int(z.argmax())
            ch = vocab.itos[nxt]
            if ch == "\n":
                break
            out += ch
            ids = torch.tensor([[nxt]])
    return out


def test_rows_read_their_own_conditions_at_every_step_whatever_the_batch(conditioned_model):
    model, vocab, conds, cfg = conditioned_model
    sampler = Sampler(model, vocab, cfg.data, conditions=conds)
    asks = [{"rating": 1, "category": "guitars"}, {"rating": "5", "category": "books"}, {}]
    greedy = [SampleParams(temperature=0, max_chars=80, stop=("\n",), conditions=a) for a in asks]
    batched = [g[0].text for g in sampler.generate(["The "] * 3, greedy)]
    for a, text in zip(asks, batched):
        ids = conds.request_ids(a)
        assert text == reference_greedy(model, vocab, "The ", ids, 80), a
    # The model learned the rating from the words: 1 star writes the bad words, 5 stars the good ones.
    one, five = batched[0], batched[1]
    assert any(w in one for w in BAD) and not any(w in one for w in GOOD), one
    assert any(w in five for w in GOOD) and not any(w in five for w in BAD), five
    # Sampled rows too: a 1-star row beside 5-star ones writes what it writes alone (its seed, its ids).
    hot = [SampleParams(temperature=0.9, max_chars=60, seed=7, conditions=a) for a in asks]
    together = sampler.generate(["\n"] * 3, hot)
    for p, g in zip(hot, together):
        assert sampler.generate(["\n"], [p])[0][0].text == g[0].text


def test_unknown_conditions_name_the_field_and_list_the_valid_values(conditioned_model, tmp_path_factory):
    model, vocab, conds, cfg = conditioned_model
    sampler = Sampler(model, vocab, cfg.data, conditions=conds)
    cases = [
        ({"rating": 7}, "rating", "valid values: 1, 2, 3, 4, 5"),
        ({"rating": "five"}, "rating", "valid values: 1, 2, 3, 4, 5"),
        ({"category": "garden"}, "category", "valid values: 'books', 'guitars'"),
        ({"colour": "red"}, "colour", "conditioned on ['rating', 'category'] only"),
    ]
    for ask, field, msg in cases:
        with pytest.raises(SampleParamError, match=re.escape(msg)) as e:
            sampler.generate(["The "], [SampleParams(conditions=ask)])
        assert e.value.field == field
    # An unconditioned model asked for a rating; steering without a sentiment unit.
    from test_serve_support import train_tiny

    plain = Sampler.load(train_tiny(tmp_path_factory.mktemp("plain"), "c", steps=5, seed=1))
    assert plain.conditions is None and plain.info()["conditions"] == {}
    with pytest.raises(SampleParamError, match="not conditioned") as e:
        plain.check_params(SampleParams(conditions={"rating": 5}))
    assert e.value.field == "rating"
    with pytest.raises(SampleParamError, match="no sentiment unit") as e:
        plain.check_params(SampleParams(steer_sentiment=1.0))
    assert e.value.field == "steer_sentiment"
    with pytest.raises(SampleParamError) as e:
        SampleParams(steer_sentiment=9.0)
    assert e.value.field == "steer_sentiment"


def test_steering_fixes_the_unit_at_every_step_of_steered_rows_only(conditioned_model):
    model, vocab, conds, cfg = conditioned_model
    sampler = Sampler(model, vocab, cfg.data, conditions=conds, sentiment_unit=UNIT)
    params = [
        SampleParams(temperature=0, max_chars=60, stop=("\n",), steer_sentiment=s) for s in (1.0, -1.0, None)
    ]
    got = [g[0].text for g in sampler.generate(["The "] * 3, params)]
    missing = [0, 0]
    assert got[0] == reference_greedy(model, vocab, "The ", missing, 60, steer=UNIT.value(1.0))
    assert got[1] == reference_greedy(model, vocab, "The ", missing, 60, steer=UNIT.value(-1.0))
    assert got[2] == reference_greedy(model, vocab, "The ", missing, 60)  # batched beside steered rows
    assert len(set(got)) == 3  # the unit matters to what is written


def test_cli_sample_takes_rating_category_and_steering(conditioned_model, tmp_path, capsys):
    from raylstm.cli import main

    run = conditioned_checkpoint(tmp_path / "run")
    UNIT.save(run / "sentiment.json")  # where `raylstm classify --probe --unit-out` puts it
    sampler = Sampler.load(run)
    assert sampler.sentiment_unit == UNIT
    assert sampler.info()["conditions"] == {
        "rating": ["1", "2", "3", "4", "5"],
        "category": ["books", "guitars"],
    }
    want = sampler.generate(
        ["The "], [SampleParams(temperature=0.7, max_chars=50, seed=3, conditions={"rating": 1, "category": "books"},
                                steer_sentiment=-1.0)]
    )[0][0].text  # fmt: skip
    args = ["sample", "--checkpoint", str(run), "--prime", "The ", "--temperature", "0.7", "--length", "50"]
    args += ["--seed", "3", "--rating", "1", "--category", "books", "--steer-sentiment", "-1"]
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[1] == "The " + want.split("\n")[0]
    assert main([*args[:-6], "--rating", "6"]) == 2
    assert "rating '6' is not one this model knows; valid values: 1, 2, 3, 4, 5" in capsys.readouterr().err


def test_the_trainers_samples_of_a_conditioned_model_read_every_field_missing(conditioned_model):
    """The training loop samples without the condition vocabulary: every field is "missing" (id 0),
    exactly as a sampler that has the vocabulary and is asked for nothing."""
    from raylstm.sample import training_samples

    model, vocab, conds, cfg = conditioned_model
    _, got = training_samples(model, vocab, cfg.data, "The ", 40, [0.0, 0.8], seed=2)
    full = Sampler(model, vocab, cfg.data, conditions=conds)
    want = full.generate(
        ["The "] * 2, [SampleParams(temperature=t, max_chars=40, seed=2) for t in (0.0, 0.8)]
    )
    assert got == {"0": want[0][0].text, "0.8": want[1][0].text}
    assert got["0"].split("\n")[0] == reference_greedy(model, vocab, "The ", [0, 0], 40)
    with pytest.raises(SampleParamError, match="no condition vocabulary"):
        Sampler(model, vocab, cfg.data).check_params(SampleParams(conditions={"rating": 1}))
