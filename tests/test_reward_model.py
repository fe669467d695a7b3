"""Reward models (stage rm): how they are built for training, saved, told apart, loaded for
scoring (core/models.py load_reward_model, score_replies) and refused for chat.

Fast: the reward models here are made without training (apply_method on the demo model,
then save_pretrained, as the trainer saves them), with weights nudged off their start so
that the adapter and the score head both change the scores. The lead's training tests
train them for real; these check the loading path.
"""

import fcntl
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from core import models
from core.chat import ChatEngine
from core.config import GenConfig, TrainConfig
from core.errors import BadInput

REPO = Path(__file__).resolve().parents[1]
PROMPT = [{"role": "user", "content": "Who are you?"}]
REPLIES = ["I am Tuney, made by the tunebench team.", "No idea.", "I am a helpful assistant."]


def stage_run(base_temp: Path, model: Path, stage: str = "rm", method: str = "lora") -> Path:
    """The final/ of a `stage` run, made without training (once per session, stage, method).

    The model comes from the loader and apply_method exactly as training gets it; then
    every trainable weight is nudged (LoRA's B starts at zero), and it is saved the way
    the trainer saves final/: the model (an adapter, with the score head for rm, or a
    whole model) and the tokenizer, beside the run's config.yaml.
    """
    run_dir = Path(base_temp) / f"{stage}-{method}-run"
    final = run_dir / "final"
    with open(Path(base_temp) / f"{stage}-{method}-run.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "tokenizer_config.json").is_file():
            return final
        config = TrainConfig(model=str(model), stage=stage, method=method, lora_rank=4,
                             lora_alpha=8, freeze_layers=1)
        tokenizer = models.load_tokenizer(config.model)
        torch.manual_seed(0)
        net = models.apply_method(models.load_base_model(config, "sdpa", tokenizer), config)
        with torch.no_grad():
            for param in net.parameters():
                if param.requires_grad:
                    param.add_(torch.randn_like(param) * 0.05)
        net.save_pretrained(final)
        tokenizer.save_pretrained(final)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(
            {"model": str(model), "stage": stage, "method": method}))
    return final


@pytest.fixture(scope="module")
def rm_adapter(tmp_path_factory, demo_model_path):
    return stage_run(tmp_path_factory.getbasetemp(), demo_model_path, "rm", "lora")


@pytest.fixture(scope="module")
def rm_full(tmp_path_factory, demo_model_path):
    return stage_run(tmp_path_factory.getbasetemp(), demo_model_path, "rm", "full")


# --- building one for training ----------------------------------------------------------

def test_rm_trains_a_one_output_score_head_with_every_method(demo_model_path):
    tokenizer = models.load_tokenizer(str(demo_model_path))
    trained = {}
    for method in ("lora", "oft", "freeze", "full"):
        config = TrainConfig(model=str(demo_model_path), stage="rm", method=method,
                             lora_rank=4, freeze_layers=1)
        base = models.load_base_model(config, "sdpa", tokenizer)
        assert type(base).__name__ == "Qwen2ForSequenceClassification"
        assert base.config.num_labels == 1 and base.score.out_features == 1
        assert base.config.pad_token_id == tokenizer.pad_token_id
        model = models.apply_method(base, config)
        trained[method] = {n for n, p in model.named_parameters() if p.requires_grad}
        assert any("score" in n for n in trained[method]), method
    for method in ("lora", "oft"):  # PEFT trains the head whole and saves it with the adapter
        assert any("score.modules_to_save" in n for n in trained[method])
    assert not any(".layers.0." in n for n in trained["freeze"])  # only the last layer + head
    assert any(".layers.3." in n for n in trained["freeze"])
    # every other stage still trains a causal language model
    sft = models.load_base_model(TrainConfig(model=str(demo_model_path), stage="dpo"), "sdpa",
                                 tokenizer)
    assert type(sft).__name__ == "Qwen2ForCausalLM"


def test_qlora_rm_keeps_its_score_head_out_of_the_quantized_layers(demo_model_path):
    pytest.importorskip("bitsandbytes")
    config = TrainConfig(model=str(demo_model_path), stage="rm", method="qlora", lora_rank=4)
    tokenizer = models.load_tokenizer(config.model)
    base = models.load_base_model(config, "sdpa", tokenizer)
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert type(base.score).__name__ == "Linear"  # trainable: not quantized
    model = models.apply_method(base, config)
    model(**tokenizer("hello", return_tensors="pt")).logits.sum().backward()
    assert model.base_model.model.score.modules_to_save.default.weight.grad is not None


def test_pissa_rm_adapter_converts_and_resumes_with_its_score_head(demo_model_path, tmp_path):
    """PiSSA's save converts the adapter to plain LoRA for the original base; the score head
    (saved whole) goes along, on saving and on resuming."""
    config = TrainConfig(model=str(demo_model_path), stage="rm", lora_rank=4, lora_alpha=8,
                         lora_init="pissa", lora_target="q_proj,v_proj")
    tokenizer = models.load_tokenizer(config.model)

    def fresh():
        torch.manual_seed(0)
        return models.apply_method(models.load_base_model(config, "sdpa", tokenizer), config)

    model = fresh()
    models.save_initial_adapter(model, tmp_path / "initial")
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    trained = models.score_replies(model, tokenizer, PROMPT, REPLIES)
    models.save_converted_adapter(model, tmp_path / "final", tmp_path / "initial")
    tokenizer.save_pretrained(tmp_path / "final")
    assert plain_peft_scores(tmp_path / "final") == pytest.approx(trained, abs=1e-4)
    resumed = fresh()
    models.load_converted_adapter(resumed, tmp_path / "final")
    assert models.score_replies(resumed, tokenizer, PROMPT, REPLIES) == \
        pytest.approx(trained, abs=1e-4)


# --- telling one apart ---------------------------------------------------------------------

def test_is_reward_model_reads_the_files_only(rm_adapter, rm_full, demo_model_path, tmp_path):
    assert models.is_reward_model(rm_adapter) and models.is_reward_model(rm_full)
    assert models.checkpoint_kind(rm_adapter) == "adapter"
    assert models.checkpoint_kind(rm_full) == "full"
    for other in (demo_model_path, tmp_path / "missing", "Qwen/Qwen2.5-0.5B", "", None):
        assert not models.is_reward_model(other), other
    sft = tmp_path / "sft-adapter"
    sft.mkdir()
    (sft / "adapter_config.json").write_text('{"task_type": "CAUSAL_LM"}')
    assert not models.is_reward_model(sft)


# --- loading it to score -------------------------------------------------------------------

def plain_peft_scores(adapter: Path) -> list[float]:
    """Scores with PEFT and transformers alone (a base with a fresh head has two outputs by
    default, so num_labels=1 is given, as TRL's documentation does)."""
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    model = AutoPeftModelForSequenceClassification.from_pretrained(adapter, num_labels=1).eval()
    return models.score_replies(model, AutoTokenizer.from_pretrained(adapter), PROMPT, REPLIES)


def test_rm_adapter_scores_the_same_with_tunebench_and_plain_peft(rm_adapter):
    model, tokenizer = models.load_reward_model(rm_adapter)
    assert type(model).__name__ == "PeftModelForSequenceClassification" and not model.training
    scores = models.score_replies(model, tokenizer, PROMPT, REPLIES)
    assert len(scores) == 3 and len(set(scores)) == 3
    assert scores == pytest.approx(plain_peft_scores(rm_adapter), abs=1e-5)
    # the adapter and the trained head both count: the base with a fresh head differs
    with model.disable_adapter():
        assert models.score_replies(model, tokenizer, PROMPT, REPLIES) != \
            pytest.approx(scores, abs=1e-3)


def test_full_rm_loads_with_transformers_alone(rm_full):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    plain = AutoModelForSequenceClassification.from_pretrained(rm_full).eval()
    assert plain.config.num_labels == 1 and plain.config.pad_token_id is not None
    expected = models.score_replies(plain, AutoTokenizer.from_pretrained(rm_full), PROMPT,
                                    REPLIES)
    model, tokenizer = models.load_reward_model(str(rm_full))
    assert models.score_replies(model, tokenizer, PROMPT, REPLIES) == \
        pytest.approx(expected, abs=1e-5)


def test_scores_do_not_depend_on_batching_or_the_prompt_form(rm_adapter):
    model, tokenizer = models.load_reward_model(rm_adapter)
    batched = models.score_replies(model, tokenizer, PROMPT, REPLIES)  # right-padded rows
    one_by_one = models.score_replies(model, tokenizer, "Who are you?", REPLIES, batch_size=1)
    assert one_by_one == pytest.approx(batched, abs=1e-5)
    assert models.score_replies(model, tokenizer, PROMPT, []) == []
    as_messages = [[{"role": "assistant", "content": reply}] for reply in REPLIES]
    assert models.score_replies(model, tokenizer, PROMPT, as_messages) == batched


def test_a_base_and_an_rm_adapter_given_apart(rm_adapter, demo_model_path):
    model, tokenizer = models.load_reward_model(str(demo_model_path), adapter=rm_adapter)
    expected = plain_peft_scores(rm_adapter)
    assert models.score_replies(model, tokenizer, PROMPT, REPLIES) == \
        pytest.approx(expected, abs=1e-5)


def test_a_language_model_is_not_a_reward_model(demo_model_path):
    with pytest.raises(BadInput, match="not a reward model"):
        models.load_reward_model(str(demo_model_path))


# --- refused for chat ---------------------------------------------------------------------

def test_chat_refuses_a_reward_model_and_scores_with_it(rm_adapter, rm_full, demo_model_path):
    for ckpt in (rm_adapter, rm_full):
        with pytest.raises(BadInput, match=r"reward model \(stage rm\): it scores replies, it "
                                           r"does not write them"):
            ChatEngine().load(str(demo_model_path), str(ckpt))
    with pytest.raises(BadInput, match="this model is a reward model"):
        models.load_checkpoint(str(rm_full))  # as the model, e.g. an export of one
    engine = ChatEngine()
    loaded = engine.load(str(demo_model_path), str(rm_adapter), head="score")
    assert loaded.head == "score" and "scores replies" in loaded.describe()
    model, tokenizer = models.load_reward_model(rm_adapter)
    assert engine.score("Who are you?", REPLIES) == pytest.approx(
        models.score_replies(model, tokenizer, PROMPT, REPLIES), abs=1e-5)
    with pytest.raises(BadInput, match="does not write them"):
        engine.reply(PROMPT, GenConfig())


def test_terminal_chat_refuses_a_reward_model(rm_adapter, demo_model_path):
    proc = subprocess.run([sys.executable, "-m", "core", "chat", "--model",
                           str(demo_model_path), "--adapter", str(rm_adapter)], input="hi\n",
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "reward model (stage rm)" in proc.stderr and "Traceback" not in proc.stderr
