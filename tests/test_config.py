"""The config schema: coercion, bounds, unknown keys, cross-field rules, round trips."""

import dataclasses

import pytest

from core import config as cfg
from core.errors import BadInput


def test_defaults_are_valid():
    assert cfg.validate(cfg.TrainConfig()) == []


def test_without_a_file_train_uses_the_quickstart_job():
    assert cfg.load(None, []) == cfg.quickstart()
    quick = cfg.quickstart()
    assert quick.model == "demo" and quick.dataset == ["identity"] and quick.method == "lora"


def test_every_field_has_help_and_group():
    for f in dataclasses.fields(cfg.TrainConfig):
        assert f.metadata["help"], f.name
        assert f.metadata["group"] in cfg.GROUPS


@pytest.mark.parametrize("pair, key, value", [
    ("learning_rate=3e-3", "learning_rate", 3e-3),
    ("epochs=2", "epochs", 2.0),
    ("batch_size=4", "batch_size", 4),
    ("packing=yes", "packing", True),
    ("dataset=identity, alpaca_demo", "dataset", ["identity", "alpaca_demo"]),
    ("resume=true", "resume", True),
    ("resume=false", "resume", False),
    ("method=qlora", "method", "qlora"),
])
def test_cli_overrides_are_coerced(pair, key, value):
    assert getattr(cfg.load(None, [pair]), key) == value


@pytest.mark.parametrize("pair, fragment", [
    ("learnin_rate=1", "did you mean 'learning_rate'"),
    ("epochs=-1", "epochs: must be at least"),
    ("batch_size=2.5", "batch_size: expected a whole number"),
    ("batch_size=true", "batch_size: expected a whole number"),
    ("method=sgd", "method: expected one of lora"),
    ("lora_dropout=0.95", "lora_dropout: must be at most 0.9"),
    ("learning_rate=fast", "learning_rate: expected a number"),
    ("learning_rate=nan", "learning_rate: expected a finite number"),
    ("packing=maybe", "packing: expected true or false"),
    ("dataset=", "dataset: expected at least one entry"),
    ("val_size=0.9", "val_size: must be at most 0.5"),
    ("quant_bits=3", "quant_bits: expected one of 4, 8"),
    ("compute_type=fp16", "fp16 training needs a GPU"),
    ("booster=flash_attention_2", "flash-attn"),
    ("resume=/nonexistent/checkpoint-3", "does not exist"),
    ("run_name=../escape", "run_name: use letters"),
    ("lora_target=q_proj;rm -rf", "lora_target"),
    ("noequals", "expected KEY=VALUE"),
])
def test_bad_values_name_the_key(pair, fragment):
    with pytest.raises(BadInput) as err:
        cfg.load(None, [pair])
    assert fragment in str(err.value)


def test_all_problems_reported_at_once():
    with pytest.raises(BadInput) as err:
        cfg.load(None, ["epochs=0", "batch_size=0", "bogus=1"])
    text = str(err.value)
    assert "epochs" in text and "batch_size" in text and "bogus" in text


def test_yaml_round_trip(tmp_path):
    config = cfg.load(None, ["method=dora", "lora_rank=8", "dataset=a,b", "learning_rate=1e-4",
                             "identity_name=小智", "packing=true"])
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml(config), encoding="utf-8")
    assert cfg.load(path) == config


def test_yaml_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1, 2\n")
    with pytest.raises(BadInput, match="bad.yaml: invalid YAML"):
        cfg.load(bad)
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(BadInput, match="bad.yaml: expected a mapping"):
        cfg.load(bad)
    with pytest.raises(BadInput, match="config file not found"):
        cfg.load(tmp_path / "missing.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(BadInput, match="invalid YAML"):
        cfg.load(evil)


def test_save_steps_beyond_total_is_a_problem():
    problems = cfg.validate(cfg.TrainConfig(save_steps=50), total_steps=10)
    assert any("save_steps" in p for p in problems)


def test_changed_lists_only_non_defaults():
    config = cfg.from_mapping({"epochs": 5})
    assert cfg.changed(config) == {"epochs": 5.0}
