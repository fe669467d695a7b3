"""Padding-free batches and packing: examples never see each other, and the loss is unchanged.

The batches here come from the real pipeline (TRL's collator and packer, the
model loaded by core.models), not from hand-built tensors.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from core import attention, models, templates
from core.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
WORDS = ("river mill grain village spring summer notebook bread yeast loaf mountain weather "
         "lighthouse museum garden tomato balcony library shelf festival ticket").split()


def load(model_path, booster):
    config = TrainConfig(model=str(model_path), booster=booster)
    return models.load_base_model(config, models.pick_attention(booster)).eval()


def mixed_rows(tokenizer, n, seed=0, cutoff=512):
    """Chat rows whose answers run from 3 to 300 words, tokenized with labels."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.choice((3, 12, 40, 120, 300))))
        record = {"messages": [{"role": "user", "content": "Tell me about " + rng.choice(WORDS)},
                               {"role": "assistant", "content": answer}]}
        rows.append(templates.encode_example(record, tokenizer, cutoff))
    return rows


@pytest.fixture(scope="module")
def tokenizer(demo_model_path):
    return models.load_tokenizer(str(demo_model_path))


def padding_free_batch(rows, pad_id):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=pad_id, padding_free=True)(rows)


@pytest.mark.parametrize("booster", ["sdpa", "eager"])
def test_packed_examples_do_not_attend_to_each_other(demo_model_path, tokenizer, booster):
    model = load(demo_model_path, booster)
    expected = "sdpa_varlen" if booster == "sdpa" else "eager"
    assert model.config._attn_implementation == expected
    rows = mixed_rows(tokenizer, 4, seed=1, cutoff=200)
    batch = padding_free_batch(rows, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       cu_seq_lens_q=batch["cu_seq_lens_q"], cu_seq_lens_k=batch["cu_seq_lens_k"],
                       max_length_q=batch["max_length_q"], max_length_k=batch["max_length_k"],
                       use_cache=False).logits[0]  # as TRL's compute_loss passes it
        start = 0
        for row in rows:
            n = len(row["input_ids"])
            alone = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            torch.testing.assert_close(packed[start:start + n], alone, atol=2e-4, rtol=1e-4)
            start += n


def test_transformers_block_mask_needs_use_cache_false(demo_model_path, tokenizer):
    """Plain SDPA with restarting position ids: transformers builds a block-diagonal mask, but
    only without a KV cache (TRL's compute_loss sets use_cache=False). sdpa_varlen reads the
    boundaries itself, so it keeps examples apart either way."""
    rows = mixed_rows(tokenizer, 3, seed=2, cutoff=120)
    batch = padding_free_batch(rows, tokenizer.pad_token_id)
    last = rows[-1]["input_ids"]
    model = load(demo_model_path, "sdpa")
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([last])).logits[0]
        varlen = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=True).logits[0]
        model.set_attn_implementation("sdpa")
        plain = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                      use_cache=False).logits[0]
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                      use_cache=True).logits[0]
    torch.testing.assert_close(varlen[-len(last):], alone, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(plain[-len(last):], alone, atol=2e-4, rtol=1e-4)
    assert (leaky[-len(last):] - alone).abs().max() > 1e-2  # the cache turns detection off


def test_bfd_packing_keeps_boundaries(demo_model_path, tokenizer):
    """TRL's best-fit-decreasing packer, then its collator: position ids restart per example."""
    from datasets import Dataset
    from trl import pack_dataset

    rows = mixed_rows(tokenizer, 12, seed=3, cutoff=256)
    packed = pack_dataset(Dataset.from_list(rows), 256, "bfd")
    assert len(packed) < len(rows)
    assert sum(sum(r["seq_lengths"]) for r in packed) == sum(len(r["input_ids"]) for r in rows)
    batch = padding_free_batch([packed[0], packed[1]], tokenizer.pad_token_id)
    starts = int((batch["position_ids"][0] == 0).sum())
    assert starts == len(packed[0]["seq_lengths"]) + len(packed[1]["seq_lengths"])


def cli_train(model, run_dir, *overrides):
    cmd = [sys.executable, "-m", "core", "train", f"model={model}", f"output_dir={run_dir}",
           "dataset=identity", f"dataset_dir={REPO / 'data'}", "max_samples=6", "batch_size=6",
           "epochs=1", "lora_rank=8", "lora_alpha=16", "learning_rate=1e-3", "logging_steps=1",
           "warmup_ratio=0", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "loss" in x]


@pytest.mark.train
def test_packed_loss_matches_unpacked_and_run_completes(demo_model_path, tmp_path):
    """One optimizer step over the same six examples: padded (eager), padding-free (SDPA per
    example) and packed into one row give the same loss. TRL divides the summed token loss
    by the number of trained tokens in the batch, which none of the layouts changes."""
    padded = cli_train(demo_model_path, tmp_path / "padded", "booster=eager")
    free = cli_train(demo_model_path, tmp_path / "free")
    packed = cli_train(demo_model_path, tmp_path / "packed", "packing=true")
    assert len(padded) == len(free) == len(packed) == 1  # six examples, one step each
    for run in (free, packed):
        assert run[0]["loss"] == pytest.approx(padded[0]["loss"], rel=1e-4)
        assert run[0]["grad_norm"] == pytest.approx(padded[0]["grad_norm"], rel=1e-3)
    assert padded[0]["nonpad_share"] < 1.0  # identity answers differ in length: some padding
    assert free[0]["nonpad_share"] == packed[0]["nonpad_share"] == 1.0
    log = (tmp_path / "packed" / "train.log").read_text()
    assert "padding-free" in log and "packing examples into rows" in log
    assert (tmp_path / "packed" / "final" / "adapter_config.json").is_file()


def test_length_grouping_lowers_padding_on_mixed_lengths(demo_model_path, tokenizer, tmp_path):
    """Padded batches (eager, no packing): the real train dataloader, grouped vs random."""
    from core.trainer import build_trainer

    rows = mixed_rows(tokenizer, 160, seed=4)
    config = TrainConfig(model=str(demo_model_path), booster="eager", batch_size=8,
                         cutoff_len=512, method="full")
    model = load(demo_model_path, "eager")
    trainer = build_trainer(config, model, tokenizer, rows, [], tmp_path, TrainerCallback())
    assert trainer.args.train_sampling_strategy == "group_by_length"

    def share():
        real = total = 0
        for batch in trainer.get_train_dataloader():
            real += int(batch["attention_mask"].sum())
            total += batch["attention_mask"].numel()
        return real / total

    grouped = share()
    trainer.args.train_sampling_strategy = "random"
    randomly = share()
    assert grouped > randomly + 0.15, (grouped, randomly)
    assert grouped > 0.8


def test_padding_free_batches_have_no_padding(demo_model_path, tokenizer, tmp_path):
    from core.trainer import build_trainer

    rows = mixed_rows(tokenizer, 24, seed=5)
    config = TrainConfig(model=str(demo_model_path), batch_size=8, cutoff_len=512)
    model = models.apply_method(load(demo_model_path, "auto"), config)
    trainer = build_trainer(config, model, tokenizer, rows, [], tmp_path, TrainerCallback())
    assert attention.padding_free(model)
    assert trainer.args.train_sampling_strategy == "random"
    batches = list(trainer.get_train_dataloader())
    assert sum(b["input_ids"].shape[1] for b in batches) == sum(len(r["input_ids"]) for r in rows)
    assert all("attention_mask" not in b and b["input_ids"].shape[0] == 1 for b in batches)
