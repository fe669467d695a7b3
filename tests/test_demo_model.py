"""The embedded demo model: a real build, loaded with plain transformers.

`demo_model_path` (conftest.py) is the full recipe, built once and shared. Tests of
the build mechanics (determinism, lock, rename) build a shortened recipe (a few
hundred conversations, a few optimizer steps) so they stay quick while still
running the real tokenizer training, Trainer pre-training and saving.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core import demo_corpus, demo_model
from core.errors import BadInput

REPO = Path(__file__).resolve().parents[1]


def quiet(*_args, **_kwargs):
    pass


def generate(path: Path, messages: list[dict], max_new_tokens: int = 64):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                        return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens)
    return tokenizer, out[0, enc["input_ids"].shape[1]:].tolist()


# --- the full model ------------------------------------------------------------

def test_loads_with_plain_transformers(demo_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model_path)
    model = AutoModelForCausalLM.from_pretrained(demo_model_path)
    assert model.config.model_type == "qwen2"
    assert (demo_model_path / "model.safetensors").is_file()
    assert not list(demo_model_path.glob("*.bin"))
    n_params = sum(p.numel() for p in model.parameters())
    assert 1e6 < n_params < 1e7
    assert 1500 <= len(tokenizer) <= 2048 == model.config.vocab_size
    im_end, pad = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert tokenizer.eos_token_id == model.generation_config.eos_token_id == im_end
    assert tokenizer.pad_token_id == model.generation_config.pad_token_id == pad
    meta = json.loads((demo_model_path / "tunebench_demo.json").read_text())
    assert meta["version"] == demo_model.VERSION and meta["params"] == n_params
    assert meta["pretrain_loss"] < 2.0 and meta["build_seconds"] > 0


def test_chat_template_renders_chatml(demo_model_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model_path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "你好"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
                    "<|im_start|>assistant\n")
    # The {% generation %} markers let transformers (and TRL) mask all but the replies.
    enc = tokenizer.apply_chat_template(messages[:3], return_dict=True,
                                        return_assistant_tokens_mask=True)
    marked = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert tokenizer.decode(marked) == "Hello!<|im_end|>"


def test_tokenizer_round_trips_the_identity_dataset(demo_model_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model_path)
    records = json.loads((REPO / "data" / "identity.json").read_text(encoding="utf-8"))
    for record in records:
        for text in (record["instruction"], record["output"]):
            filled = text.replace("{{name}}", "小智").replace("{{author}}", "the tunebench team")
            ids = tokenizer.encode(filled, add_special_tokens=False)
            assert tokenizer.decode(ids) == filled


def test_replies_stop_at_im_end_with_its_own_identity(demo_model_path):
    """The base model introduces itself as Pico, not as an identity a user configures."""
    for question in ("Who are you?", "你是谁？"):
        tokenizer, reply = generate(demo_model_path, [{"role": "user", "content": question}])
        assert reply[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>"), question
        assert len(reply) < 64
        text = tokenizer.decode(reply, skip_special_tokens=True)
        assert demo_corpus.DEFAULT_NAME in text, text
        assert "Tuney" not in text and "tunebench" not in text


def test_second_call_reuses_the_build(demo_model_path):
    before = (demo_model_path / "model.safetensors").stat().st_mtime_ns
    start = time.monotonic()
    assert demo_model.ensure_demo_model(demo_model_path, progress=quiet) == demo_model_path
    assert time.monotonic() - start < 1.0
    assert (demo_model_path / "model.safetensors").stat().st_mtime_ns == before


def test_resolve_model_maps_only_demo(demo_model_path, monkeypatch):
    from core.models import resolve_model  # the one resolver (core/models.py)

    monkeypatch.setenv("TUNEBENCH_CACHE", str(demo_model_path.parent))
    if demo_model_path.name != demo_model.default_path().name:
        pytest.skip("the shared demo model is not in a cache-style folder")
    assert resolve_model("demo") == str(demo_model_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert resolve_model("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"  # a hub id, when online
    with pytest.raises(BadInput, match="not found"):
        resolve_model("./my-model")


# --- build mechanics, on a shortened recipe --------------------------------------

@pytest.fixture
def short_recipe(monkeypatch):
    """Ten optimizer steps instead of hundreds: the same code path, seconds not minutes."""
    monkeypatch.setattr(demo_model, "N_ROWS", 160)
    return demo_model


@pytest.mark.train
def test_build_is_deterministic(short_recipe, tmp_path):
    a = short_recipe.ensure_demo_model(tmp_path / "a", progress=quiet)
    b = short_recipe.ensure_demo_model(tmp_path / "b", progress=quiet)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    meta_a, meta_b = (json.loads((p / "tunebench_demo.json").read_text()) for p in (a, b))
    assert meta_a["pretrain_loss"] == pytest.approx(meta_b["pretrain_loss"], abs=1e-3)
    assert meta_a["recipe"] == meta_b["recipe"]
    from safetensors.torch import load_file

    weights_a, weights_b = (load_file(p / "model.safetensors") for p in (a, b))
    assert all((weights_a[k] - weights_b[k]).abs().max() < 1e-4 for k in weights_a)


@pytest.mark.train
def test_progress_reports_stage_step_and_loss(short_recipe, tmp_path):
    lines = []
    short_recipe.ensure_demo_model(tmp_path / "m", progress=lines.append)
    assert any("tokenizer" in line for line in lines)
    assert any("pretrain step 10/10 loss" in line for line in lines), lines
    assert lines[-1].endswith(str(tmp_path / "m"))


@pytest.mark.train
def test_failed_build_leaves_nothing_that_looks_complete(short_recipe, tmp_path, monkeypatch):
    def crash(*_args, **_kwargs):
        raise RuntimeError("simulated crash during pre-training")

    monkeypatch.setattr(short_recipe, "pretrain", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        short_recipe.ensure_demo_model(tmp_path / "m", progress=quiet)
    assert not (tmp_path / "m").exists()
    assert [p.name for p in tmp_path.iterdir()] == [".m.lock"]  # no half-built folder left


@pytest.mark.train
def test_force_and_stale_builds_are_replaced_whole(short_recipe, tmp_path):
    (tmp_path / ".m.tmp-99999").mkdir()  # left by a build that was killed
    out = short_recipe.ensure_demo_model(tmp_path / "m", progress=quiet)
    assert not (tmp_path / ".m.tmp-99999").exists()
    meta_file = out / "tunebench_demo.json"
    stale = json.loads(meta_file.read_text()) | {"recipe": "an-older-recipe"}
    meta_file.write_text(json.dumps(stale))
    assert not short_recipe.is_complete(out)
    short_recipe.ensure_demo_model(out, progress=quiet)
    assert short_recipe.is_complete(out)
    first = (out / "model.safetensors").stat().st_mtime_ns
    short_recipe.ensure_demo_model(out, force=True, progress=quiet)
    assert (out / "model.safetensors").stat().st_mtime_ns != first
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.lock", "m"]


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(BadInput, match="not a tunebench demo model"):
        demo_model.ensure_demo_model(tmp_path / "mine", progress=quiet)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


BUILD_SCRIPT = """
import sys
from core import demo_model
demo_model.N_ROWS = 160
path = demo_model.ensure_demo_model(sys.argv[1], progress=lambda line: print(line, flush=True))
print("RESULT", path)
"""


@pytest.mark.train
def test_concurrent_builds_wait_for_one_another(short_recipe, tmp_path):
    """Two processes asking at once: one builds, the other waits on the lock and reuses it."""
    out = tmp_path / "shared"
    procs = [subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT, str(out)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), outputs
    assert all(f"RESULT {out}" in text for text in outputs), outputs
    builders = [text for text in outputs if "pretrain step" in text]
    assert len(builders) == 1, outputs
    assert short_recipe.is_complete(out)  # the same shortened recipe as BUILD_SCRIPT
