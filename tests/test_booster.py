"""Boosters (attention implementations, Liger), optimizers, RoPE scaling and pure bf16.

This machine has no GPU and neither flash-attn nor liger-kernel: asking for
them must be a clear error naming what to install, never a silent fallback.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, TrainerCallback

from core import attention, models
from core import config as cfg
from core.config import TrainConfig
from core.errors import BadInput

REPO = Path(__file__).resolve().parents[1]


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "core", "train", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_auto_picks_padding_free_sdpa_on_cpu(demo_model_path):
    assert not torch.cuda.is_available()
    assert models.pick_attention("auto") == "sdpa"
    model = models.load_base_model(TrainConfig(model=str(demo_model_path)), "sdpa")
    assert model.config._attn_implementation == attention.VARLEN
    assert attention.padding_free(model)
    assert attention.describe(model) == "sdpa (padding-free, one call per example)"


def test_eager_stays_padded(demo_model_path):
    config = TrainConfig(model=str(demo_model_path), booster="eager")
    model = models.load_base_model(config, models.pick_attention("eager"))
    assert model.config._attn_implementation == "eager"
    assert not attention.padding_free(model)
    assert "padded batches grouped by length" in attention.describe(model)


@pytest.mark.parametrize("booster, words", [
    ("flash_attention_2", ("flash-attn", "pip install", "GPU")),
    ("liger", ("liger-kernel", "pip install")),
])
def test_missing_booster_is_a_clear_error(booster, words, demo_model_path):
    problems = cfg.validate(TrainConfig(booster=booster))
    assert len(problems) == 1 and all(w in str(problems[0]) for w in words), problems
    proc = cli(f"model={demo_model_path}", f"booster={booster}", timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert all(w in proc.stderr + proc.stdout for w in words)


def test_liger_on_cpu_names_the_gpu_it_needs(demo_model_path):
    """Even with liger-kernel installed, its Triton kernels cannot run on a CPU."""
    model = models.load_base_model(TrainConfig(model=str(demo_model_path)), "sdpa")
    with pytest.raises(BadInput, match="NVIDIA GPU"):
        attention.apply_booster(model, "liger")


def test_models_that_cannot_run_sdpa_per_example_keep_plain_sdpa():
    full = AutoConfig.for_model("qwen2", num_hidden_layers=2)
    sliding = AutoConfig.for_model("qwen2", num_hidden_layers=2, use_sliding_window=True,
                                   sliding_window=16, max_window_layers=0)
    mistral = AutoConfig.for_model("mistral", num_hidden_layers=2, sliding_window=4096)
    gemma2 = AutoConfig.for_model("gemma2", num_hidden_layers=2)
    assert attention.varlen_ok(full)
    assert not attention.varlen_ok(sliding)
    assert not attention.varlen_ok(mistral)
    assert not attention.varlen_ok(gemma2)


def test_segments_from_boundaries_or_position_ids():
    q = torch.zeros(1, 2, 7, 4)
    assert attention._segments(q, torch.tensor([0, 3, 7]), None) == [0, 3, 7]
    assert attention._segments(q, None, torch.tensor([[0, 1, 2, 0, 1, 2, 3]])) == [0, 3, 7]
    assert attention._segments(q, None, torch.arange(7)[None]) is None  # one plain sequence
    assert attention._segments(torch.zeros(2, 2, 7, 4), None, None) is None  # padded batch


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn", "llama3"])
def test_rope_scaling_reaches_the_model(demo_model_path, kind):
    config = TrainConfig(model=str(demo_model_path), rope_scaling=kind, rope_factor=2.0)
    model = models.load_base_model(config, "sdpa")
    params = model.config.rope_parameters
    assert params["rope_type"] == kind and params["factor"] == 2.0
    assert model.config.max_position_embeddings == 4096
    plain = models.load_base_model(TrainConfig(model=str(demo_model_path)), "sdpa")
    scaled_freq = model.model.rotary_emb.inv_freq
    if kind == "linear":
        torch.testing.assert_close(scaled_freq, plain.model.rotary_emb.inv_freq / 2)
    elif kind in ("yarn", "llama3"):
        assert not torch.allclose(scaled_freq, plain.model.rotary_emb.inv_freq)
    ids = torch.randint(3, 2000, (1, 3000))  # beyond the 2048 positions it was built for
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.parametrize("optim", ["adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit",
                                   "adafactor", "sgd", "adamw_torch"])
def test_every_optimizer_is_accepted_and_built_on_cpu(demo_model_path, tmp_path, optim):
    """bitsandbytes 0.50 runs its 8-bit and paged AdamW on CPU (paging only matters on a GPU),
    so validate() refuses none of them here."""
    from core.trainer import build_trainer

    config = TrainConfig(model=str(demo_model_path), optim=optim)
    assert cfg.validate(config) == []
    tokenizer = models.load_tokenizer(str(demo_model_path))
    model = models.apply_method(models.load_base_model(config, "sdpa"), config)
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7, 8]}] * 4
    trainer = build_trainer(config, model, tokenizer, rows, [], tmp_path, TrainerCallback())
    opt = trainer.create_optimizer()
    if "8bit" in optim:
        import bitsandbytes as bnb
        assert isinstance(opt, bnb.optim.optimizer.Optimizer8bit) and opt.args.optim_bits == 8
    assert trainer.args.optim.value == optim


def test_pure_bf16_loads_bf16_weights(demo_model_path):
    config = TrainConfig(model=str(demo_model_path), compute_type="pure_bf16")
    model = models.load_base_model(config, "sdpa")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.train
def test_pure_bf16_8bit_optimizer_and_yarn_train_on_cpu(demo_model_path, tmp_path):
    run = tmp_path / "run"
    proc = cli(f"model={demo_model_path}", f"output_dir={run}", "dataset=identity",
               f"dataset_dir={REPO / 'data'}", "max_samples=8", "batch_size=4", "epochs=1",
               "compute_type=pure_bf16", "optim=adamw_8bit", "rope_scaling=yarn",
               "rope_factor=2", "lora_rank=8", "lora_alpha=16", "learning_rate=1e-3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (run / "train.log").read_text()
    assert "RoPE scaling: yarn x2, context 2048 -> 4096" in log
    assert "precision pure_bf16" in log
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in x]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)


@pytest.mark.train
def test_bf16_autocast_runs_on_cpu(demo_model_path, tmp_path):
    """transformers refuses bf16 without a GPU unless the run says it is a CPU run."""
    run = tmp_path / "run"
    proc = cli(f"model={demo_model_path}", f"output_dir={run}", "dataset=identity",
               f"dataset_dir={REPO / 'data'}", "max_samples=4", "batch_size=4", "epochs=1",
               "compute_type=bf16")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "precision bf16" in (run / "train.log").read_text()
