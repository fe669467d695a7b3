"""Every shipped example config loads and validates, and names only bundled datasets."""

from pathlib import Path

import pytest

from core import config as cfg
from core import data

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


def test_there_are_examples():
    assert len(EXAMPLES) >= 4


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_valid(path, monkeypatch):
    monkeypatch.chdir(path.parents[1])
    raw = cfg.read_yaml(path)
    if raw.get("distributed", "ddp") != "ddp" or raw.get("compute_type") in ("fp16", "bf16"):
        pytest.skip("needs a GPU")
    config = cfg.load(path)
    registered = data.list_datasets(config.dataset_dir)
    assert all(name in registered for name in config.dataset)
    fitting = data.datasets_for_stage(config.stage, config.dataset_dir)
    assert all(name in fitting for name in config.dataset), (config.stage, config.dataset)


def test_every_stage_has_an_example():
    stages = {cfg.read_yaml(p).get("stage", "sft") for p in EXAMPLES}
    assert stages == set(cfg.STAGES)


def test_identity_example_is_the_first_job_with_a_new_name():
    path = next(p for p in EXAMPLES if p.name == "identity_lora.yaml")
    example = cfg.load(path)
    assert cfg.to_dict(example) == {**cfg.to_dict(cfg.first_job()), "identity_name": "Nova",
                                     "identity_author": "Acme Labs"}


EVAL_EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples" / "eval").glob("*.yaml"))


@pytest.mark.parametrize("path", EVAL_EXAMPLES, ids=lambda p: p.name)
def test_eval_example_is_valid(path, monkeypatch):
    """Eval configs load through the eval schema and name bundled datasets (their adapter,
    saves/identity/final, exists once the identity example has been trained)."""
    monkeypatch.chdir(path.parents[2])
    config = cfg.eval_config(cfg.read_yaml(path), str(path))
    registered = data.list_datasets(config.dataset_dir)
    assert config.eval_task == "harness" or all(n in registered for n in config.dataset)
    assert {cfg.read_yaml(p)["eval_task"] for p in EVAL_EXAMPLES} >= {"predict", "loss", "choice"}
