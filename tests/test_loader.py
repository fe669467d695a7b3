"""The one checkpoint loader (core/models.py load_checkpoint), and the single helpers that
training, chat and export share: run-folder naming (core/runs.py), the file lock
(core/locks.py) and ChatML (core/templates.py). Fast: no training, a tiny adapter made here."""

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from core import attention, chat, demo_model, locks, models, runs, templates
from core.config import TrainConfig
from core.errors import BadInput

PROMPT = [{"role": "user", "content": "Who are you?"}]


@pytest.fixture(scope="module")
def adapter(demo_model_path, tmp_path_factory):
    """A LoRA adapter of the demo model, inside a run folder whose config names the base.

    init_lora_weights=False starts B non-zero, so the adapter changes the logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(demo_model_path)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False, task_type="CAUSAL_LM"))
    run_dir = tmp_path_factory.mktemp("loader") / "lora-run"
    peft_model.save_pretrained(run_dir / "final")
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": str(demo_model_path),
                                                         "method": "lora"}))
    return run_dir / "final"


def logits(tokenizer, model) -> torch.Tensor:
    inputs = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        return model(**inputs).logits


def reference(demo_model_path, adapter_dir=None):
    """What plain transformers (and PEFT) load: the loader must return the same model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(demo_model_path)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    return AutoTokenizer.from_pretrained(demo_model_path), model.eval()


# --- the loader --------------------------------------------------------------------------

def test_base_model_is_what_transformers_loads(demo_model_path):
    steps = []
    tokenizer, model = models.load_checkpoint(str(demo_model_path),
                                              progress=lambda m, f: steps.append((f, m)))
    assert not model.training and model.dtype == torch.float32 and model.device.type == "cpu"
    assert torch.equal(logits(tokenizer, model), logits(*reference(demo_model_path)))
    assert [f for f, _ in steps] == sorted(f for f, _ in steps)
    assert "Loading base model demo-model-v1 as float32" in [m for _, m in steps]


def test_demo_resolves_to_the_built_model(demo_model_path, monkeypatch):
    monkeypatch.setenv("TUNEBENCH_CACHE", str(demo_model_path.parent))
    if demo_model_path.name != demo_model.default_path().name:
        pytest.skip("the shared demo model is not in a cache-style folder")
    assert models.resolve_model("demo") == str(demo_model_path)
    tokenizer, model = models.load_checkpoint("demo")
    assert Path(model.name_or_path) == demo_model_path
    assert not hasattr(demo_model, "resolve_model") and not hasattr(chat, "FALLBACK_TEMPLATE")
    assert chat.resolve_model is models.resolve_model  # one function, known by both names


def test_adapter_is_applied_and_its_base_found(adapter, demo_model_path):
    expected = logits(*reference(demo_model_path, adapter))
    tokenizer, model = models.load_checkpoint(str(demo_model_path), str(adapter))
    assert type(model).__name__ == "PeftModelForCausalLM" and not model.training
    assert torch.allclose(logits(tokenizer, model), expected, atol=1e-5)
    base_only = logits(*models.load_checkpoint(str(demo_model_path)))
    assert not torch.allclose(base_only, expected, atol=1e-3)  # the adapter changes the model

    # No model given: the base comes from the run's config.yaml ...
    assert models.base_model_of(adapter) == str(demo_model_path)
    tokenizer, model = models.load_checkpoint(None, str(adapter))
    assert torch.allclose(logits(tokenizer, model), expected, atol=1e-5)
    # ... or, outside a run folder, from adapter_config.json.
    loose = adapter.parent.parent / "loose-adapter"
    shutil.copytree(adapter, loose)
    assert models.base_model_of(loose) == str(demo_model_path)
    tokenizer, model = models.load_checkpoint(None, str(loose))
    assert torch.allclose(logits(tokenizer, model), expected, atol=1e-5)


def test_full_checkpoint_is_loaded_instead_of_the_base(adapter, demo_model_path, tmp_path):
    """A whole-model checkpoint (a full/freeze run's final/): here base + adapter, merged."""
    tokenizer, merged = reference(demo_model_path, adapter)
    expected = logits(tokenizer, merged)
    full = tmp_path / "full-run" / "final"
    merged.merge_and_unload().save_pretrained(full)
    tokenizer.save_pretrained(full)
    (full.parent / "config.yaml").write_text(f"model: {demo_model_path}\nmethod: full\n")
    assert models.checkpoint_kind(full) == "full"
    for model_name in (str(demo_model_path), None):
        tok, model = models.load_checkpoint(model_name, str(full))
        assert type(model).__name__ == "Qwen2ForCausalLM"
        assert torch.allclose(logits(tok, model), expected, atol=1e-4)


def test_pickled_weights_are_refused_naming_the_folder(tmp_path, demo_model_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(demo_model_path / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(BadInput, match="safetensors") as err:
        models.load_checkpoint(str(pickled))
    assert str(pickled) in str(err.value)
    with pytest.raises(BadInput, match="safetensors"):  # nor as a full checkpoint
        models.load_checkpoint(str(demo_model_path), str(pickled))
    adapter_bin = tmp_path / "adapter-bin"
    adapter_bin.mkdir()
    (adapter_bin / "adapter_config.json").write_text("{}")
    (adapter_bin / "adapter_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(BadInput, match="pickled and never loaded") as err:
        models.load_checkpoint(str(demo_model_path), str(adapter_bin))
    assert str(adapter_bin) in str(err.value)


def test_adapter_as_the_model_and_no_model_are_explained(adapter):
    with pytest.raises(BadInput, match="adapter, not a whole model"):
        models.load_checkpoint(str(adapter))
    with pytest.raises(BadInput, match="no model given"):
        models.load_checkpoint("  ")


def test_dtype_policy_on_cpu(demo_model_path):
    assert not torch.cuda.is_available()
    stored = {name: types.SimpleNamespace(dtype=name) for name in ("bfloat16", "float16",
                                                                   "float32")}
    pick = models.pick_dtype
    # to run on a CPU: fp32, except a model stored in bf16 stays bf16
    assert pick("auto", stored["bfloat16"], "cpu") == torch.bfloat16
    assert pick("auto", stored["float16"], "cpu") == torch.float32
    assert pick("auto", stored["float32"], "cpu") == torch.float32
    assert pick("auto", None, "cpu") == torch.float32
    # export keeps what is stored; named dtypes are taken as they are
    assert pick("stored", stored["float16"]) == torch.float16
    assert pick("stored", types.SimpleNamespace(dtype=None)) == torch.float32
    assert pick("bf16", stored["float32"]) == torch.bfloat16
    assert pick(torch.float16) == torch.float16
    # training: fp32 master weights under mixed precision, bf16 only for pure_bf16
    assert pick("auto", stored["bfloat16"], train=True) == torch.float32
    assert pick("bf16", stored["float32"], train=True) == torch.float32
    assert pick("pure_bf16", stored["float32"], train=True) == torch.bfloat16
    with pytest.raises(BadInput, match="dtype"):
        pick("int3")
    _, model = models.load_checkpoint(str(demo_model_path), dtype="bf16")
    assert model.dtype == torch.bfloat16


def test_training_options_go_through_the_one_loader(demo_model_path):
    tokenizer = models.load_tokenizer(str(demo_model_path))
    config = TrainConfig(model=str(demo_model_path), compute_type="pure_bf16")
    model = models.load_base_model(config, "eager", tokenizer)
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"
    _, model = models.load_checkpoint(str(demo_model_path), purpose="train", tokenizer=tokenizer,
                                      attention="sdpa", booster="auto")
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == attention.VARLEN  # apply_booster: padding-free


@pytest.mark.parametrize("stage", ["dpo", "kto", "grpo"])
def test_preference_and_rl_results_load_for_chat_like_sft(stage, demo_model_path,
                                                          tmp_path_factory):
    """dpo, kto and grpo write causal-LM adapters: nothing in the loader assumes sft."""
    from test_reward_model import stage_run

    final = stage_run(tmp_path_factory.getbasetemp(), demo_model_path, stage, "lora")
    assert not models.is_reward_model(final)
    expected = logits(*reference(demo_model_path, final))
    tokenizer, model = models.load_checkpoint(None, str(final))  # base from the run's config
    assert type(model).__name__ == "PeftModelForCausalLM"
    assert torch.allclose(logits(tokenizer, model), expected, atol=1e-5)
    loaded = chat.ChatEngine().load(str(demo_model_path), str(final))
    assert loaded.kind == "adapter" and loaded.head == "causal"


def test_the_head_is_checked_before_any_weight_loads(adapter, demo_model_path):
    with pytest.raises(BadInput, match="expected head causal or score"):
        models.load_checkpoint(str(demo_model_path), head="value")
    with pytest.raises(BadInput, match="not a reward model"):  # a random head scores nothing
        models.load_checkpoint(str(demo_model_path), str(adapter), head="score")
    assert models.head_of(TrainConfig(stage="rm")) == "score"
    assert {models.head_of(TrainConfig(stage=s)) for s in ("sft", "pt", "dpo", "kto",
                                                           "grpo")} == {"causal"}


# --- one ChatML ----------------------------------------------------------------------------

def test_one_chatml_in_the_demo_model_the_named_template_and_the_fallback(demo_model_path,
                                                                         tmp_path):
    tokenizer = models.load_tokenizer(str(demo_model_path))
    assert tokenizer.chat_template == templates.CHATML == templates.TEMPLATES["chatml"].jinja
    assert demo_model.is_complete(demo_model_path)  # same text, same recipe: no rebuild
    named = models.load_tokenizer(str(demo_model_path), template="chatml")
    text = named.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n"

    plain = tmp_path / "no-template"
    shutil.copytree(demo_model_path, plain)
    (plain / "chat_template.jinja").unlink()
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(BadInput, match="no chat template"):  # training never guesses one
        models.load_tokenizer(str(plain))
    tokenizer, _ = models.load_checkpoint(str(plain))  # chat and export fall back to ChatML
    assert tokenizer.chat_template == templates.CHATML


# --- one run-folder rule -----------------------------------------------------------------------

def test_run_folder_naming(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "default_run_name", lambda method, stage="sft": f"{method}-20260101-120000")
    config = TrainConfig()
    first = runs.pick_run_dir(config, tmp_path)
    assert first == tmp_path / "lora-20260101-120000"
    first.mkdir()
    assert runs.pick_run_dir(config, tmp_path) == tmp_path / "lora-20260101-120000-2"

    (tmp_path / "mine").mkdir()
    with pytest.raises(BadInput, match="run_name 'mine' is taken"):
        runs.pick_run_dir(TrainConfig(run_name="mine"), tmp_path)
    assert runs.pick_run_dir(TrainConfig(run_name="mine", resume=True), tmp_path) == \
        tmp_path / "mine"

    done = tmp_path / "done"
    done.mkdir()
    (done / runs.METRICS).write_text("{}\n")
    (done / runs.CONFIG).write_text("model: demo\n")
    for config_file in (None, done / runs.CONFIG):
        with pytest.raises(BadInput, match="already holds a run"):
            runs.pick_run_dir(TrainConfig(output_dir=str(done)), tmp_path, config_file)
    assert runs.pick_run_dir(TrainConfig(output_dir=str(done), resume=True)) == done

    # The launcher (and the Train tab's snippet) writes config.yaml first, then starts the
    # trainer on it: that folder is the run's own, until training has written metrics.
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / runs.CONFIG).write_text("model: demo\n")
    runs.write_status(prepared, "running")
    with pytest.raises(BadInput, match="already holds a run"):
        runs.pick_run_dir(TrainConfig(output_dir=str(prepared)), tmp_path)
    assert runs.pick_run_dir(TrainConfig(output_dir=str(prepared)), tmp_path,
                             prepared / runs.CONFIG) == prepared


# --- one lock ---------------------------------------------------------------------------------

def test_the_lock_is_exclusive_between_processes(tmp_path):
    lock_file = tmp_path / ".lock"
    probe = ("import fcntl, sys\nwith open(sys.argv[1], 'a+') as fh:\n"
             "    try:\n        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
             "    except BlockingIOError:\n        sys.exit(3)\n")

    def other_process_gets_it() -> bool:
        code = subprocess.run([sys.executable, "-c", probe, str(lock_file)]).returncode
        return code == 0

    with locks.held(lock_file):
        assert not other_process_gets_it()
    assert other_process_gets_it()
