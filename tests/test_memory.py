"""The memory estimate: parameter counts, the direction of every knob, and measured peaks.

The measured tests train for real in a subprocess and compare the estimate with
the process's peak RSS (the kernel's high-water mark), on the demo model and on
a ~100M-parameter Qwen2 built from a config.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core import memory
from core.config import TrainConfig
from core.device import Device

REPO = Path(__file__).resolve().parents[1]
CPU = Device("cpu", "cpu", 1, 16.0, bf16=False)
GPU24 = Device("cuda", "NVIDIA L4", 1, 24.0, bf16=True)
QWEN2_05B = dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                 tie_word_embeddings=True)
LLAMA_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                vocab_size=32000, tie_word_embeddings=False)
QWEN2_100M = dict(model_type="qwen2", hidden_size=768, intermediate_size=2560, num_hidden_layers=13,
                  num_attention_heads=12, num_key_value_heads=4, vocab_size=2048,
                  tie_word_embeddings=True, max_position_embeddings=2048)


def est(info, dev=CPU, **settings):
    return memory.estimate(TrainConfig(**settings), info, dev)


@pytest.mark.parametrize("info", [QWEN2_05B, LLAMA_7B, QWEN2_100M], ids=["qwen2", "llama", "100m"])
def test_parameter_count_matches_transformers(info):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**info)
    with torch.device("meta"):  # shapes only, no memory
        model = AutoModelForCausalLM.from_config(config)
    real = sum(p.numel() for p in model.parameters())
    assert memory.count_params(memory.shape_of(info))[0] == real


def test_demo_model_count(demo_model_path):
    info = json.loads((demo_model_path / "config.json").read_text())
    meta = json.loads((demo_model_path / "tunebench_demo.json").read_text())
    assert memory.count_params(memory.shape_of(info))[0] == meta["params"]


def test_each_setting_moves_the_estimate_the_right_way():
    full, lora = est(LLAMA_7B, method="full"), est(LLAMA_7B, method="lora")
    qlora4, qlora8 = (est(LLAMA_7B, method="qlora", quant_bits=b) for b in (4, 8))
    assert qlora4.total_gb < qlora8.total_gb < lora.total_gb < full.total_gb
    assert lora.trainable < full.trainable / 50
    assert est(LLAMA_7B, method="freeze", freeze_layers=2).trainable < full.trainable / 10
    plain, ckpt = est(QWEN2_05B), est(QWEN2_05B, gradient_checkpointing=True)
    assert ckpt.activations_gb < plain.activations_gb  # its 152k-word logits stay
    assert est(LLAMA_7B, gradient_checkpointing=True).activations_gb < \
        est(LLAMA_7B).activations_gb / 3
    assert est(QWEN2_05B, batch_size=16).activations_gb > plain.activations_gb * 1.9
    assert est(QWEN2_05B, cutoff_len=2048).activations_gb > plain.activations_gb * 1.9
    assert est(QWEN2_05B, booster="eager").activations_gb > plain.activations_gb
    assert est(LLAMA_7B, method="full", compute_type="pure_bf16").weights_gb == \
        pytest.approx(full.weights_gb / 2, rel=0.01)
    assert est(LLAMA_7B, method="full", optim="adamw_8bit").optimizer_gb == \
        pytest.approx(full.optimizer_gb / 4, rel=0.01)
    assert est(LLAMA_7B, method="full", optim="sgd").optimizer_gb == 0
    # bf16 autocast on a GPU halves the layers' activations (TRL's logits stay fp32)
    assert est(LLAMA_7B, dev=GPU24).activations_gb < est(LLAMA_7B).activations_gb * 0.6


def test_each_stage_counts_what_it_adds():
    base = dict(batch_size=4, cutoff_len=1024)
    sft = est(QWEN2_05B, **base)
    dpo, kto, rm = (est(QWEN2_05B, stage=stage, **base) for stage in ("dpo", "kto", "rm"))
    # dpo and rm keep chosen AND rejected for backward: twice the layers' activations
    assert dpo.activations_gb > sft.activations_gb * 1.5 and dpo.total_gb > sft.total_gb
    assert dpo.sequences == 2 and "2 sequences per example" in dpo.breakdown()
    assert kto.activations_gb == sft.activations_gb  # its KL pass keeps no gradients
    # rm: a one-output score head instead of the LM head (no 152k-word logits), chosen +
    # rejected; the head is always trained (with LoRA too)
    hidden = QWEN2_05B["hidden_size"]
    assert rm.sequences == 2 and rm.reference_gb == 0
    assert rm.params == sft.params + hidden and rm.trainable == sft.trainable + hidden  # tied
    assert rm.activations_gb < dpo.activations_gb * 0.75  # no vocabulary-wide logits
    untied_rm, untied = est(LLAMA_7B, stage="rm", method="full"), est(LLAMA_7B, method="full")
    assert untied_rm.params == untied.params - 32000 * 4096 + 4096  # its lm_head is gone
    assert untied_rm.weights_gb < untied.weights_gb

    # dpo and kto compute the reference's log-probabilities once before training
    # (core/stages.py): no copy is kept, and the breakdown says why
    for stage in ("dpo", "kto"):
        full = est(LLAMA_7B, stage=stage, method="full")
        assert full.reference_gb == 0 and "computed once before training" in full.breakdown()
    assert est(LLAMA_7B, stage="dpo", method="full").total_gb > \
        est(LLAMA_7B, method="full").total_gb  # chosen + rejected


def test_a_reference_copy_only_with_full_or_freeze_tuning(monkeypatch):
    """Where the reference is a model (not precomputed), full and freeze tuning hold a
    second, frozen copy of the weights; an adapter's reference is the base with it off."""
    from core import stages

    monkeypatch.setattr(stages, "stage_args", lambda config: {})  # a reference model kept
    for stage in ("dpo", "kto"):
        full = est(LLAMA_7B, stage=stage, method="full")
        assert full.reference_gb == pytest.approx(full.weights_gb, rel=0.01), stage
        assert full.gradients_gb > 0 and "reference copy" in full.breakdown()
        assert est(LLAMA_7B, stage=stage, method="freeze").reference_gb == full.reference_gb
        for method in ("lora", "qlora", "dora", "oft"):
            lora = est(LLAMA_7B, stage=stage, method=method)
            assert lora.reference_gb == 0 and "reference copy" not in lora.breakdown()
    for loss in ("orpo", "simpo"):  # reference-free losses
        assert est(LLAMA_7B, stage="dpo", method="full", pref_loss=loss).reference_gb == 0
    for stage in ("sft", "pt", "rm"):
        assert est(LLAMA_7B, stage=stage, method="full").reference_gb == 0


def test_grpo_counts_generation_reference_and_reward_model(demo_model_path, tmp_path):
    grpo = est(QWEN2_05B, stage="grpo", batch_size=8, num_generations=4, cutoff_len=1024,
               max_completion_length=256, reward_funcs=["length"])
    assert grpo.generation_gb > 0 and "generation cache" in grpo.breakdown()
    longer = est(QWEN2_05B, stage="grpo", batch_size=8, num_generations=4, cutoff_len=1024,
                 max_completion_length=1024, reward_funcs=["length"])
    assert longer.generation_gb > grpo.generation_gb * 1.9  # 512 + 1024 vs 512 + 256 tokens
    s = memory.shape_of(QWEN2_05B)  # KV cache: k and v, fp32 on the CPU, 8 x (512 + 256)
    kv = 2 * s.layers * s.kv_heads * s.head_dim * 4 * 8 * (512 + 256)
    assert grpo.generation_gb * memory.GB == pytest.approx(kv + 8 * s.vocab * 8, rel=0.01)
    assert grpo.reference_gb == 0 and grpo.reward_gb == 0
    full = dict(stage="grpo", method="full", reward_funcs=["length"])
    assert est(QWEN2_05B, **full).reference_gb > 0  # pref_beta > 0: a frozen reference
    assert est(QWEN2_05B, **full, pref_beta=0.0).reference_gb == 0

    # a reward model adds its weights, read from its config.json (never its weights) ...
    with_rm = est(QWEN2_05B, stage="grpo", reward_model=str(demo_model_path))
    demo = json.loads((demo_model_path / "config.json").read_text())
    demo_params = memory.count_params(memory.shape_of(demo))[0] + demo["hidden_size"]  # tied
    rm_bytes = memory.reward_model_bytes(str(demo_model_path), CPU)
    assert rm_bytes == demo_params * 4  # fp32 on a CPU
    assert with_rm.reward_gb == round(rm_bytes / memory.GB, 3) > 0
    assert "reward model" in with_rm.breakdown()
    assert with_rm.total_gb > est(QWEN2_05B, stage="grpo").total_gb
    # ... or, for an rm run's adapter, from its base model's
    adapter = tmp_path / "rm-run" / "final"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"task_type": "SEQ_CLS", "base_model_name_or_path": str(demo_model_path)}))
    assert est(QWEN2_05B, stage="grpo", reward_model=str(adapter)).reward_gb == \
        with_rm.reward_gb
    assert memory.reward_model_bytes(str(demo_model_path), GPU24) == rm_bytes / 2  # bf16
    # unknown: said, not guessed
    unknown = est(QWEN2_05B, stage="grpo", reward_model="someone/reward-model")
    assert unknown.reward_gb == 0 and "reward model size unknown" in unknown.breakdown()


def test_fits_warns_only_when_too_big():
    assert memory.fits(est(QWEN2_05B, batch_size=1, cutoff_len=256), CPU) is None
    warning = memory.fits(est(LLAMA_7B, method="full", dev=GPU24), GPU24)
    assert warning and "NVIDIA L4 (24 GB)" in warning and "qlora" in warning
    assert memory.fits(est(LLAMA_7B, method="qlora", batch_size=1, cutoff_len=512, dev=GPU24),
                       GPU24) is None


def test_unknown_model_gives_no_estimate(tmp_path):
    config = TrainConfig(model=str(tmp_path / "missing"))
    assert memory.estimate(config) is None
    assert "unavailable" in memory.describe(config)


def test_describe_is_one_line_without_torch(demo_model_path):
    """The web page calls describe(); it must not import torch (seconds, hundreds of MB)."""
    code = ("import sys; from core import memory; from core.config import TrainConfig; "
            f"print(memory.describe(TrainConfig(model={str(demo_model_path)!r}))); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, timeout=60, check=True).stdout.splitlines()
    assert out[-1] == "False"
    assert out[0].startswith("≈ ") and " GB needed (weights " in out[0] and "fits in" in out[0]


# --- measured against real training -----------------------------------------------

def long_rows(path: Path, n: int, words: int = 420) -> Path:
    """Chat rows long enough that every one fills cutoff_len: the estimate's worst case."""
    vocab = "the river turns the old mill wheel through wet springs and dry summers".split()
    answer = " ".join(vocab[i % len(vocab)] for i in range(words))
    rows = [{"messages": [{"role": "user", "content": f"Tell story {i}."},
                          {"role": "assistant", "content": answer}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def peak_rss_gb(cmd: list[str]) -> float:
    """Run `cmd` and return its peak RSS from the kernel (ru_maxrss of the waited child)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    out = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, out[-3000:]
    return usage.ru_maxrss / 2**20


def measured_vs_estimated(model_dir: Path, data: Path, run_dir: Path, **settings):
    overrides = [f"{k}={v}" for k, v in settings.items()]
    cmd = [sys.executable, "-m", "core", "train", f"model={model_dir}", f"dataset={data}",
           f"output_dir={run_dir}", "epochs=1", *overrides]
    measured = peak_rss_gb(cmd)
    estimate = memory.estimate(TrainConfig(model=str(model_dir), **settings))
    print(f"peak RSS {measured:.2f} GB, estimated {estimate.total_gb:.2f} GB "
          f"({estimate.breakdown()})")
    return measured, estimate


@pytest.mark.train
def test_estimate_within_half_of_measured_on_demo(demo_model_path, tmp_path):
    data = long_rows(tmp_path / "long.jsonl", 16)
    measured, e = measured_vs_estimated(demo_model_path, data, tmp_path / "run", batch_size=8,
                                        cutoff_len=512, lora_rank=8, lora_alpha=16)
    assert 0.5 * measured <= e.total_gb <= 1.5 * measured, (measured, e)


@pytest.fixture(scope="module")
def model_100m(demo_model_path, tmp_path_factory):
    """A randomly initialised ~100M-parameter Qwen2 with the demo tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("qwen2-100m")
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**QWEN2_100M))
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (demo_model_path / name).exists():
            shutil.copy(demo_model_path / name, folder / name)
    return folder


@pytest.mark.train
def test_estimate_within_half_of_measured_on_100m_full(model_100m, tmp_path):
    data = long_rows(tmp_path / "long.jsonl", 4, words=250)
    measured, e = measured_vs_estimated(model_100m, data, tmp_path / "run", method="full",
                                        batch_size=2, cutoff_len=256, learning_rate=1e-5)
    assert e.params > 95e6
    assert 0.5 * measured <= e.total_gb <= 1.5 * measured, (measured, e)
