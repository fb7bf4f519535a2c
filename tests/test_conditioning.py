"""Conditioning on rating and category: the condition vocabulary, the windows' per-position condition
ids (independent windows, stateful segments, seed windows), the model's concatenated embeddings, and the
checkpoint (a conditioned one round-trips its conditions; an unconditioned one is exactly as before)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raylstm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from raylstm.conditions import ConditionError, ConditionVocab
from raylstm.config import Config
from raylstm.data import stream_condition_rows, stream_rows
from raylstm.model import build_model
from raylstm.train_loop import segment_windows, split_batch, window_loss
from raylstm.vocab import CharVocab

REVIEWS = [
    ("I loved it, works great.", 5.0, "Musical Instruments"),
    ("Broke in a week, awful.", 1.0, "books"),
    ("It is fine I guess.", 3.0, "books"),
    ("No rating on this one.", None, "dvd"),
    ("A category nobody trained on.", 4.0, "garden"),
]
TEXTS = [t for t, _, _ in REVIEWS]
VOCAB = CharVocab.from_counts({c: 5 for c in set("".join(TEXTS) + "\n")})
CONDS = ConditionVocab.from_counts(
    ("rating", "category"),
    {("5", "Musical Instruments"): 7, ("1", "books"): 2, ("3", "books"): 1, (None, "dvd"): 1},
)


def condition_ids() -> np.ndarray:
    return CONDS.encode_rows({"rating": [r for _, r, _ in REVIEWS], "category": [c for _, _, c in REVIEWS]})


def reference_stream_conditions(cond: np.ndarray) -> list[tuple[int, ...]]:
    """Per character of the stream "r0\\nr1\\n...": the condition ids of the review it belongs to, the
    "\\n" ending a review being part of it. Written as a plain loop, independent of the numpy code."""
    out = []
    for text, c in zip(TEXTS, cond):
        out.extend([tuple(int(v) for v in c)] * (len(text) + 1))
    return out


def test_vocabulary_ids_missing_values_and_json_round_trip(tmp_path: Path):
    assert CONDS.fields == ("rating", "category")
    assert CONDS.values["rating"] == ["1", "2", "3", "4", "5"]  # every star, seen or not
    assert CONDS.values["category"] == ["Musical Instruments", "books", "dvd"]
    assert CONDS.sizes == [6, 4]  # + id 0, missing
    # No rating, an unseen category: id 0, not an error (data is never refused for its conditions).
    assert condition_ids().tolist() == [[5, 1], [1, 2], [3, 2], [0, 3], [4, 0]]
    CONDS.save(tmp_path / "c.json")
    back = ConditionVocab.load(tmp_path / "c.json")
    assert back == CONDS and back.fingerprint() == CONDS.fingerprint()
    assert back.joint_counts[("5", "Musical Instruments")] == 7 and back.joint_counts[(None, "dvd")] == 1


def test_requests_name_the_unknown_field_and_list_the_valid_values():
    assert CONDS.request_ids({"rating": 1, "category": "books"}) == [1, 2]
    assert CONDS.request_ids({"rating": "4"}) == [4, 0]
    with pytest.raises(ConditionError, match=r"rating 7 .*valid values: 1, 2, 3, 4, 5") as e:
        CONDS.request_ids({"rating": 7})
    assert e.value.field == "rating"
    with pytest.raises(ConditionError, match=r"category 'toys' .*'Musical Instruments', 'books', 'dvd'") as e:
        CONDS.request_ids({"category": "toys"})
    assert e.value.field == "category"
    with pytest.raises(ConditionError, match="conditioned on") as e:
        CONDS.request_ids({"colour": "red"})
    assert e.value.field == "colour"
    for odd in (10**400, 4.5, True, "nan", "1e400"):  # refused by name, never an uncaught error (a 500)
        with pytest.raises(ConditionError, match="valid values") as e:
            CONDS.request_ids({"rating": odd})
        assert e.value.field == "rating"


def test_prior_is_the_training_frequency_of_each_combination():
    combos = [[5, 1], [1, 2], [3, 2]]  # counts 7, 2, 1; add-one smoothed: 8, 3, 2 of 13
    np.testing.assert_allclose(np.exp(CONDS.prior(combos)), [8 / 13, 3 / 13, 2 / 13])


@pytest.mark.parametrize("width,stride", [(9, 8), (33, 32), (7, 3)])  # windows, segments, seed windows
def test_every_id_carries_its_reviews_conditions(width: int, stride: int):
    cond = condition_ids()
    ids, rows = stream_condition_rows(TEXTS, cond, VOCAB, width, stride)
    np.testing.assert_array_equal(ids, stream_rows(TEXTS, VOCAB, width, stride))  # ids exactly as before
    per_char = reference_stream_conditions(cond)
    assert rows.shape == (len(ids), width, 2)
    for r in range(len(ids)):
        expect = per_char[r * stride : r * stride + width]
        assert [tuple(v) for v in rows[r].tolist()] == expect


def test_segments_cut_conditions_as_they_cut_ids_and_targets_read_their_own_review():
    """The training loop's slicing: window j of a segment and its condition ids, x read with the conditions
    of the character it predicts (the "\\n" ending a review is read with the next review's)."""
    T, n = 8, 4
    cond = condition_ids()
    ids, rows = stream_condition_rows(TEXTS, cond, VOCAB, n * T + 1, n * T)
    per_char = reference_stream_conditions(cond)
    windows = list(segment_windows(torch.as_tensor(ids), T))
    conds = list(segment_windows(torch.as_tensor(rows), T))
    assert len(windows) == len(conds) == n
    stream = "".join(t + "\n" for t in TEXTS)
    for j, (w, c) in enumerate(zip(windows, conds)):
        x, y = split_batch(w, "full")
        read_with = c[:, 1:]
        for b in range(len(ids)):
            start = b * n * T + j * T
            assert VOCAB.decode(x[b].tolist()) == stream[start : start + T]
            assert [tuple(v) for v in read_with[b].tolist()] == per_char[start + 1 : start + T + 1]
    # Where a review starts: the input "\n" of review 0 is read with review 1's conditions.
    end0 = len(TEXTS[0])
    assert stream[end0] == "\n" and per_char[end0 + 1] == tuple(cond[1])


def conditioned_config(fields=("rating", "category")) -> Config:
    cfg = Config()
    m = cfg.model
    m.vocab_size, m.embed_dim, m.hidden_size, m.dropout = len(VOCAB), 8, 16, 0.0
    m.conditions, m.condition_dim = list(fields), 3
    m.condition_sizes = ConditionVocab.from_counts(fields, {}).sizes if fields else []
    if fields == ("rating", "category"):
        m.condition_sizes = CONDS.sizes
    return cfg


def test_the_condition_embedding_is_concatenated_to_the_characters_at_every_step():
    torch.manual_seed(0)
    model = build_model(conditioned_config().model).eval()
    assert model.lstm.input_size == 8 + 2 * 3
    x = torch.as_tensor(VOCAB.encode(TEXTS[0]), dtype=torch.long)[None]
    five, one = torch.tensor([[5, 1]]), torch.tensor([[1, 1]])
    # Independent reference: the LSTM fed [char embedding ; rating embedding ; category embedding].
    manual = torch.cat(
        [
            model.embed(x),
            model.cond_embed[0].weight[5].expand(1, x.shape[1], 3),
            model.cond_embed[1].weight[1].expand(1, x.shape[1], 3),
        ],
        dim=-1,
    )
    out, _ = model.lstm(manual)
    torch.testing.assert_close(model(x, None, five)[0], model.head(out), rtol=0, atol=0)
    # Per row [B, F] and per position [B, T, F] agree; the condition changes the output; None = missing.
    per_pos = five[:, None, :].expand(1, x.shape[1], 2)
    torch.testing.assert_close(model(x, None, per_pos)[0], model(x, None, five)[0], rtol=0, atol=0)
    assert not torch.allclose(model(x, None, five)[0], model(x, None, one)[0])
    torch.testing.assert_close(model(x)[0], model(x, None, torch.zeros(1, 2, dtype=torch.long))[0])
    # A window's loss reads the conditions beside its targets.
    ids = torch.as_tensor(VOCAB.encode(TEXTS[0] + "\n"), dtype=torch.long)[None]
    cond = torch.zeros(1, ids.shape[1], 2, dtype=torch.long)
    cond[:, 1:] = five  # position 0 is never read: x = ids[:-1] is read with the targets' cond[1:]
    s, n, _ = window_loss(model, ids, "full", None, cond)
    logits, _ = model(ids[:, :-1], None, five)
    ref = torch.nn.functional.cross_entropy(logits[0], ids[0, 1:], reduction="sum")
    torch.testing.assert_close(s, ref)
    assert n == ids.shape[1] - 1


def test_a_conditioned_checkpoint_round_trips_its_conditions(tmp_path: Path):
    cfg = conditioned_config()
    torch.manual_seed(1)
    model = build_model(cfg.model).eval()
    path = save_checkpoint(tmp_path / "c", model, VOCAB, cfg, step=3, conditions=CONDS)
    assert (path / "conditions.json").exists()
    loaded = load_checkpoint(path)
    assert loaded.conditions == CONDS and loaded.config.model.condition_sizes == CONDS.sizes
    x = torch.as_tensor(VOCAB.encode(TEXTS[1]), dtype=torch.long)[None]
    for c in ([1, 2], [5, 1], [0, 0]):
        cond = torch.tensor([c])
        torch.testing.assert_close(loaded.model(x, None, cond)[0], model(x, None, cond)[0], rtol=0, atol=0)
    # The conditions file is part of the checkpoint: a changed value is refused by name.
    d = json.loads((path / "conditions.json").read_text())
    d["values"]["category"][1] = "books!"
    (path / "conditions.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"conditions\.json.*checksum"):
        load_checkpoint(path)
    # Saving a conditioned model without its vocabulary (or the other way round) is refused.
    with pytest.raises(CheckpointError, match="condition vocabulary"):
        save_checkpoint(tmp_path / "d", model, VOCAB, cfg, step=3)


def test_an_unconditioned_checkpoint_is_exactly_as_before(tmp_path: Path):
    """Conditioning off: the same weights (names and shapes) as a model that predates it, no new file,
    and a checkpoint written before the conditioning fields existed still loads, with identical logits."""
    cfg = conditioned_config(fields=())
    torch.manual_seed(2)
    model = build_model(cfg.model).eval()
    # The model as it was before conditioning: Embedding -> LSTM(E) -> Linear, nothing else.
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        "embed.weight": (len(VOCAB), 8),
        "lstm.weight_ih_l0": (64, 8),
        "lstm.weight_hh_l0": (64, 16),
        "lstm.bias_ih_l0": (64,),
        "lstm.bias_hh_l0": (64,),
        "lstm.weight_hh_l1": (64, 16),
        "lstm.weight_ih_l1": (64, 16),
        "lstm.bias_ih_l1": (64,),
        "lstm.bias_hh_l1": (64,),
        "head.weight": (len(VOCAB), 16),
        "head.bias": (len(VOCAB),),
    }
    path = save_checkpoint(tmp_path / "c", model, VOCAB, cfg, step=1)
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.safetensors", "vocab.json"]
    meta = json.loads((path / "meta.json").read_text())
    assert "conditions_fingerprint" not in meta and "conditions.json" not in meta["sha256"]
    # As an older raylstm wrote it: no conditioning fields in the model config at all.
    for k in ("conditions", "condition_dim", "condition_sizes"):
        del meta["config"]["model"][k]
    (path / "meta.json").write_text(json.dumps(meta))
    loaded = load_checkpoint(path)
    assert loaded.conditions is None and not loaded.model.conditioned
    x = torch.as_tensor(VOCAB.encode(TEXTS[2]), dtype=torch.long)[None]
    torch.testing.assert_close(loaded.model(x)[0], model(x)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="not conditioned"):
        loaded.model(x, None, torch.tensor([[1]]))
