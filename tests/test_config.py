"""Config: defaults <- file <- dotted overrides, through one function, with errors that name the field."""

from __future__ import annotations

import json

import pytest

from raylstm.config import Config, ConfigError, load_config


def test_defaults_file_and_overrides_layer_in_order(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text(
        '[train]\nlr = 1e-3\nnum_workers = 2\n[model]\nhidden_size = 256\n[data]\nsources = ["a.json"]\n'
    )
    cfg = load_config(f, ["train.lr=3e-3", "data.lowercase=true", "train.temperatures=[0.2, 1.0]"])
    assert cfg.train.lr == 3e-3  # override beats file
    assert cfg.train.num_workers == 2  # file beats default
    assert cfg.model.hidden_size == 256
    assert cfg.model.num_layers == Config().model.num_layers  # untouched default
    assert cfg.data.lowercase is True
    assert cfg.data.sources == ["a.json"]
    assert cfg.train.temperatures == (0.2, 1.0)


def test_yaml_file_and_int_promoted_to_float(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 1\n  betas: [0.9, 0.95]\n")
    cfg = load_config(f)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.betas == (0.9, 0.95)


def test_string_override_without_quotes():
    cfg = load_config(None, ["train.sample_prime=Great strings", "model.kind=seed"])
    assert cfg.train.sample_prime == "Great strings"
    assert cfg.model.kind == "seed"


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.lrr=1", "train.lrr"),
        ("nosuch.x=1", "nosuch"),
        ("train.num_workers=1.5", "train.num_workers"),
        ("model.kind=gru", "model.kind"),
        ("data.dedupe=3", "data.dedupe"),
        ("data.format=jsonl", "data.format"),  # a Literal: the reader never sees an unknown format
    ],
)
def test_bad_override_names_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_key_in_file_names_file_and_field(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[train]\nlearning_rate = 1\n")
    with pytest.raises(ConfigError, match=r"bad\.toml.*train\.learning_rate"):
        load_config(f)


def test_round_trip_through_json():
    cfg = load_config(None, ["train.lr=5e-4", "data.seq_len=64"])
    again = Config.from_dict(json.loads(cfg.to_json()))
    assert again == cfg


def test_shipped_presets_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    presets = sorted(root.glob("*.toml"))
    if not presets:
        pytest.skip("no presets in configs/ yet")
    for p in presets:
        load_config(p)  # raises ConfigError naming the field on any typo


def test_data_categories_table_from_file_and_override(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[data.categories]\n"*Musical*" = "Musical Instruments"\n')
    assert load_config(p).data.categories == {"*Musical*": "Musical Instruments"}
    cfg = load_config(overrides=['data.categories={"*.tsv" = "Gift Card"}'])
    assert cfg.data.categories == {"*.tsv": "Gift Card"}
    with pytest.raises(ConfigError, match="data.categories must be a table"):
        load_config(overrides=["data.categories=3"])
    with pytest.raises(ConfigError, match="data.categories must be a string"):
        load_config(overrides=['data.categories={"*" = 3}'])


def test_cpu_conditioned_twin_is_cpu_quality_on_mi_plus_blitzer():
    """bench.conditioning's "same model without conditions" is cpu-conditioned with model.conditions=[]:
    that twin must be cpu-quality's model and schedule on the MI reviews plus the Blitzer directory, and
    every source must get a category (Blitzer's directories name theirs; the MI CSV's from data.categories)."""
    from pathlib import Path

    from raylstm.formats import category_for

    root = Path(__file__).resolve().parents[1] / "configs"
    quality = load_config(root / "cpu-quality.toml")
    cond = load_config(root / "cpu-conditioned.toml")
    twin = load_config(root / "cpu-conditioned.toml", ["model.conditions=[]"])
    assert cond.model.conditions == ["rating", "category"] and twin.model.conditions == []
    assert cond.data.sources == quality.data.sources + ["../shared/data/amazon/sorted_data_acl"]
    globs = tuple(cond.data.categories.items())
    for source in cond.data.sources:
        assert "sorted_data_acl" in source or category_for(source, globs), source
    assert twin.model == quality.model  # condition_dim is inert without conditions
    assert twin.train == quality.train
    twin.data.sources, twin.data.categories = quality.data.sources, quality.data.categories
    assert twin.data == quality.data
