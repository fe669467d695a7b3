"""The adapter variants of the LoRA panel (rsLoRA, PiSSA, LoRA+) and OFT as a method.

Each one trains the demo model for real on CPU, is shown to be really in effect (not
just accepted as a setting), and its final/ exports through core.export with the
export's own verification passing. Most runs go through core.train's own set-up, fit
and save steps in this process, so the test can look inside the trainer (the optimizer,
the model in memory); the rsLoRA run goes through `tunebench train` as a user runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from core import config as cfg
from core import export, runs
from core.errors import BadInput

REPO = Path(__file__).resolve().parents[1]
# 16 records, 4 per step, 2 epochs: 8 steps with a checkpoint after the first epoch.
QUICK = dict(dataset=["identity"], dataset_dir=str(REPO / "data"), max_samples=16, batch_size=4,
             epochs=2, cutoff_len=128, lora_rank=8, lora_alpha=16, learning_rate=1e-3,
             warmup_ratio=0.0, save_steps=4)
PROBE = [[1, 5, 9, 33, 100, 7, 250, 12]]


def train_here(model: Path, run_dir: Path, **overrides):
    """Prepare, set up, fit and save as `tunebench train` does, in this process.

    Returns the trainer (model and optimizer still in memory) and the run folder.
    """
    from core import train

    config = cfg.from_mapping({**QUICK, "model": str(model), "output_dir": str(run_dir),
                               **overrides})
    config, run_dir = train.prepare_run_dir(config)
    trainer, resume_from = train.setup(config, run_dir, SimpleNamespace(requested=False))
    trainer.train(resume_from_checkpoint=resume_from)
    train.save_final(trainer, run_dir)
    return trainer, run_dir


def assert_loss_fell(run_dir: Path) -> None:
    losses = [r["loss"] for r in runs.read_metrics(run_dir) if "loss" in r]
    assert len(losses) >= 4, losses
    assert sum(losses[-2:]) < sum(losses[:2]), losses


def assert_exports(model: Path, adapter: Path, out: Path) -> None:
    """Merged, sharded, reloaded and verified by core.export itself."""
    plan = export.plan_export(str(model), str(adapter), str(out), shard_size="3MB")
    result = export.export(plan, report=export.Reporter(as_json=True))
    assert result["ok"] and result["verified"], result["checks"]
    assert (out / "model.safetensors.index.json").is_file()


def adapter_config(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))


def logits(model):
    import torch

    model.eval()
    with torch.no_grad():
        return model(torch.tensor(PROBE)).logits


def on_original_base(model_path: Path, adapter: Path):
    """The adapter as chat and export load it: PEFT, on the unmodified base model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path),
                                     str(adapter))


# --- the settings: validation and the form ---------------------------------------------

def test_pissa_is_refused_where_it_cannot_load_on_the_original_base():
    def problems(**values):
        return cfg.validate(cfg.TrainConfig(lora_init="pissa", **values))

    assert problems(method="lora") == []
    assert problems(method="full") == []  # a LoRA setting is ignored by other methods
    assert problems(method="oft") == []
    assert any(str(p).startswith("lora_init: pissa needs a full-precision base")
               for p in problems(method="qlora"))
    assert any(str(p).startswith("lora_init:") and "dora" in str(p)
               for p in problems(method="dora"))


def test_form_round_trip_keeps_the_variants_and_shows_them_per_method():
    import gradio as gr

    from webui import form

    with gr.Blocks():
        built = form.build_form(cfg.TrainConfig(), ["identity"])
    for config in (cfg.TrainConfig(use_rslora=True, lora_init="pissa", loraplus_lr_ratio=16.0),
                   cfg.TrainConfig(method="oft", oft_block_size=16)):
        assert form.to_config(built.names, form.values_of(config, built.names)) == config
    limited = built.method_limited
    for method, shown, hidden in (("oft", {"oft_block_size"}, {"use_rslora", "lora_init",
                                                              "loraplus_lr_ratio", "lora_rank"}),
                                  ("dora", {"use_rslora", "lora_init", "loraplus_lr_ratio"},
                                   {"oft_block_size"}),
                                  ("full", set(), {"use_rslora", "oft_block_size"})):
        visible = {n for n, u in zip(limited, form.visibility(method, limited)) if u["visible"]}
        assert shown <= visible and not hidden & visible, method


# --- real training -------------------------------------------------------------------------

@pytest.mark.train
def test_rslora_scales_by_the_square_root_of_the_rank(demo_model_path, tmp_path):
    """Through `tunebench train`, as a user runs it."""
    run_dir = tmp_path / "rslora"
    overrides = [f"{k}={cfg.format_value(v)}" for k, v in QUICK.items()]
    proc = subprocess.run([sys.executable, "-m", "core", "train", f"model={demo_model_path}",
                           f"output_dir={run_dir}", *overrides, "use_rslora=true"],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    final = run_dir / "final"
    assert adapter_config(final)["use_rslora"] is True
    loaded = on_original_base(demo_model_path, final)
    layer = loaded.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(16 / 8 ** 0.5)  # alpha/sqrt(r), not alpha/r
    assert_loss_fell(run_dir)
    assert_exports(demo_model_path, final, tmp_path / "export")


@pytest.mark.train
def test_pissa_adapters_load_on_the_original_base_and_resume(demo_model_path, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from core import models

    trainer, run_dir = train_here(demo_model_path, tmp_path / "pissa", lora_init="pissa")
    trained = logits(trainer.model)
    # PiSSA is in effect: the base weights in memory are the residual, not the original.
    original = AutoModelForCausalLM.from_pretrained(demo_model_path)
    residual = trainer.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.allclose(residual, original.model.layers[0].self_attn.q_proj.weight)
    assert_loss_fell(run_dir)

    for folder in (run_dir / "final", run_dir / "checkpoint-4"):
        saved = adapter_config(folder)  # converted: plain LoRA of twice the rank
        assert saved["init_lora_weights"] is True and saved["r"] == 16, saved
    reloaded = logits(on_original_base(demo_model_path, run_dir / "final"))
    assert (reloaded - trained).abs().max().item() < 1e-4

    # Resuming from the converted checkpoint restores the PiSSA adapter exactly...
    resumed, _ = train_here(demo_model_path, tmp_path / "resumed", lora_init="pissa",
                            resume=str(run_dir / "checkpoint-4"))
    assert (logits(resumed.model) - trained).abs().max().item() < 1e-4
    # ...and an adapter that is not a converted PiSSA one of this rank is refused.
    trainer.model.save_pretrained(str(tmp_path / "unconverted"))
    with pytest.raises(BadInput, match="not saved by a PiSSA run"):
        models.load_converted_adapter(resumed.model, tmp_path / "unconverted")
    assert_exports(demo_model_path, run_dir / "final", tmp_path / "export")


@pytest.mark.train
def test_loraplus_trains_b_matrices_at_ratio_times_the_learning_rate(demo_model_path, tmp_path):
    import torch

    trainer, run_dir = train_here(demo_model_path, tmp_path / "loraplus", loraplus_lr_ratio=16)
    optimizer = trainer.optimizer.optimizer  # inside accelerate's wrapper
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    rates = {}  # "lora_A"/"lora_B" -> the starting rates of the groups holding them
    for group in optimizer.param_groups:
        for param in group["params"]:
            kind = "lora_B" if ".lora_B." in names[id(param)] else "lora_A"
            rates.setdefault(kind, set()).add(round(group["initial_lr"], 9))
    assert rates == {"lora_A": {1e-3}, "lora_B": {16e-3}}, rates
    assert type(optimizer) is torch.optim.AdamW  # what optim: adamw_torch selects
    assert_loss_fell(run_dir)
    assert_exports(demo_model_path, run_dir / "final", tmp_path / "export")


@pytest.mark.train
def test_oft_trains_an_adapter_that_chat_and_export_take(demo_model_path, tmp_path):
    from core import chat, memory, models

    trainer, run_dir = train_here(demo_model_path, tmp_path / "oft", method="oft",
                                  learning_rate=3e-3)
    final = run_dir / "final"
    saved = adapter_config(final)
    assert saved["peft_type"] == "OFT" and saved["oft_block_size"] == 32
    assert chat.checkpoint_kind(final) == "adapter"
    config = cfg.TrainConfig(method="oft")
    shape = memory.shape_of(memory.model_info(str(demo_model_path)))
    assert models.count_parameters(trainer.model)[0] == memory.trainable_params(shape, config)
    assert_loss_fell(run_dir)
    assert_exports(demo_model_path, final, tmp_path / "export")
