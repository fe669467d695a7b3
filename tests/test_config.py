"""The config schema: coercion, bounds, unknown keys, cross-field rules, round trips."""

import dataclasses

import pytest

from core import config as cfg
from core.errors import BadInput


def test_defaults_are_valid():
    assert cfg.validate(cfg.TrainConfig()) == []


def test_without_a_file_train_runs_the_demo_model_with_its_recommendations():
    first = cfg.load(None, [])
    assert first == cfg.first_job() == cfg.resolve({"model": "demo"}).config
    assert first.model == "demo" and first.dataset == ["identity"] and first.method == "lora"
    assert first.learning_rate == 2e-3 and first.epochs == 20  # not the 7B-sized 2e-4 / 3


def test_settings_are_layered_schema_model_yaml_command_line():
    resolved = cfg.resolve({"model": "demo", "epochs": 5, "lora_rank": 8},
                           {"lora_rank": "4", "seed": "7"})
    config, sources = resolved.config, resolved.sources
    assert (config.learning_rate, sources["learning_rate"]) == (2e-3, "model")
    assert (config.epochs, sources["epochs"]) == (5, "yaml")         # YAML beats the model
    assert (config.lora_rank, sources["lora_rank"]) == (4, "command line")
    assert (config.seed, sources["seed"]) == (7, "command line")
    assert (config.warmup_ratio, sources["warmup_ratio"]) == (0.03, "schema")
    assert resolved.from_layer("model") == {"lora_alpha": 64, "learning_rate": 2e-3,
                                            "batch_size": 8}


def test_recommendations_follow_stage_and_method_and_a_folder_may_carry_them(tmp_path):
    assert "lora_rank" not in cfg.recommendations("demo", "sft", "full")
    assert cfg.recommendations("demo", "sft", "full")["learning_rate"] > 0
    assert cfg.recommendations("Qwen/Qwen2.5-0.5B") == {}   # a hub id: schema defaults
    model = tmp_path / "my-model"
    model.mkdir()
    (model / cfg.RECOMMENDED_FILE).write_text('{"sft": {"*": {"epochs": 4}, '
                                              '"lora": {"lora_rank": 16}}}')
    assert cfg.recommendations(str(model)) == {"epochs": 4, "lora_rank": 16}
    assert cfg.resolve({"model": str(model)}).config.epochs == 4
    (model / cfg.RECOMMENDED_FILE).write_text('{"sft": {"*": {"epochz": 4}}}')
    with pytest.raises(BadInput, match="epochz"):
        cfg.resolve({"model": str(model)})


def test_a_large_save_steps_asks_for_the_final_model_only():
    assert cfg.validate(cfg.TrainConfig(save_steps=10**6)) == []


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


def test_changed_lists_only_non_defaults():
    config = cfg.from_mapping({"epochs": 5})
    assert cfg.changed(config) == {"epochs": 5.0}
