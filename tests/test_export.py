"""Export: size-sharded safetensors from a real identity fine-tune, verified by reloading;
refusals, and failures that leave nothing behind; every stage's result (a reward model is
exported as a sequence classifier and verified by its scores)."""

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from core import export
from core.errors import BadInput
from test_chat import ENV, NAME, REPO, identity_run, mismatched_adapter
from test_reward_model import PROMPT, REPLIES, plain_peft_scores, stage_run

SHARD = "3MB"  # the demo model is ~14 MB in fp32, its largest tensor 2.1 MB: 5+ shards


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, demo_model_path):
    return identity_run(tmp_path_factory.getbasetemp(), demo_model_path)


def export_cli(*args, preexec=None):
    """`tunebench export` as the Export tab runs it: JSON progress lines on stdout."""
    return subprocess.run([sys.executable, "-m", "core", "export", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**ENV, "TUNEBENCH_PROGRESS": "json"}, preexec_fn=preexec)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# --- fast checks ------------------------------------------------------------------------

def test_shard_sizes_parse_like_the_hub():
    assert export.parse_size("500MB") == 500 * 10**6
    assert export.parse_size("2GB") == 2 * 10**9
    assert export.parse_size("1.5GiB") == int(1.5 * 2**30)
    assert export.parse_size("300k") == 300_000 and export.parse_size(4_000_000) == 4_000_000
    for bad in ("", "big", "-1GB", "12XB", "0MB", "10B"):
        with pytest.raises(BadInput, match="shard"):
            export.parse_size(bad)


def test_destination_checks_happen_before_loading(tmp_path, demo_model_path):
    model = str(demo_model_path)
    with pytest.raises(BadInput, match="would replace the model"):
        export.plan_export(model, None, model)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    with pytest.raises(BadInput, match="already exists"):
        export.plan_export(model, None, str(other))
    with pytest.raises(BadInput, match="not a model export"):
        export.plan_export(model, None, str(other), overwrite=True)
    assert (other / "mine.txt").read_text() == "keep me"
    with pytest.raises(BadInput, match="dtype"):
        export.plan_export(model, None, str(tmp_path / "x"), dtype="int3")
    with pytest.raises(BadInput, match="not found"):
        export.plan_export(model, str(tmp_path / "missing"), str(tmp_path / "x"))
    with pytest.raises(BadInput, match="does not fit the base model"):
        export.plan_export(model, str(mismatched_adapter(tmp_path, demo_model_path)),
                           str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_unwritable_destination_is_a_clear_error_and_leaves_nothing(tmp_path, demo_model_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = export_cli("--model", demo_model_path, "--out", blocker / "export")
    assert proc.returncode == 2 and "cannot write the export here" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and sorted(os.listdir(tmp_path)) == ["a-file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders anyway")
def test_read_only_folder_is_a_clear_error(tmp_path, demo_model_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    proc = export_cli("--model", demo_model_path, "--out", locked / "export")
    assert proc.returncode == 2 and "cannot write the export here" in proc.stderr
    assert os.listdir(locked) == []


def test_disk_full_mid_write_leaves_nothing(tmp_path, demo_model_path):
    """A file-size limit makes the third shard's write fail, as a full disk would."""
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_500_000, 2_500_000))

    out = tmp_path / "exports" / "demo"
    proc = export_cli("--model", demo_model_path, "--out", out, "--shard-size", SHARD,
                      preexec=limit_file_size)
    assert proc.returncode == 2, proc.stdout[-1500:] + proc.stderr[-1500:]
    assert "disk is full" in proc.stderr and "Traceback" not in proc.stderr
    progress = [json.loads(line) for line in proc.stdout.splitlines()]
    assert progress[-1]["progress"] >= 0.3  # it failed while writing, not while planning
    assert not out.exists() and leftovers(out.parent) == []


# --- the identity fine-tune, merged ----------------------------------------------------------

@pytest.fixture(scope="module")
def exported(run_dir, demo_model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "identity"
    proc = export_cli("--model", demo_model_path, "--adapter", run_dir / "final", "--out", out,
                      "--shard-size", SHARD)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    return out, lines


@pytest.mark.train
def test_export_is_sharded_indexed_and_verified(exported):
    out, lines = exported
    fractions = [line["progress"] for line in lines if "progress" in line]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    result = lines[-1]["result"]
    assert result["ok"] and result["verified"], result
    assert {c["name"] for c in result["checks"] if c["ok"]} == {
        "shards within the size limit and indexed", "reloads with transformers",
        "generation config stops at the template's stop tokens",
        "same greedy tokens as the source", "generation stops at eos"}
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 3 and all(p.stat().st_size <= export.parse_size(SHARD) for p in shards)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert not list(out.glob("*.bin")) and not list(out.glob("adapter_*"))
    for name in ("config.json", "generation_config.json", "tokenizer.json", "README.md"):
        assert (out / name).is_file(), name
    assert leftovers(out.parent) == []


@pytest.mark.train
def test_export_matches_adapter_on_base(exported, run_dir, demo_model_path):
    """Logits and greedy tokens of the export equal base + adapter (PEFT), with plain
    transformers, and generation ends at the template's stop token."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = exported
    tokenizer = AutoTokenizer.from_pretrained(out)
    merged = AutoModelForCausalLM.from_pretrained(out)
    source = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_model_path),
                                       run_dir / "final")
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "Who are you?"}],
                                           add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        diff = (merged(**inputs).logits - source(**inputs).logits).abs().max().item()
        ids = merged.generate(**inputs, do_sample=False, max_new_tokens=64)[0]
        ref = source.generate(**inputs, do_sample=False, max_new_tokens=64,
                              eos_token_id=merged.generation_config.eos_token_id)[0]
    assert diff < 1e-4, diff
    assert ids.tolist() == ref.tolist()
    reply = ids[inputs["input_ids"].shape[1]:]
    assert tokenizer.convert_ids_to_tokens(int(reply[-1])) == "<|im_end|>"  # stopped by itself
    assert NAME in tokenizer.decode(reply, skip_special_tokens=True)
    assert "<|im_end|>" in tokenizer.chat_template


@pytest.mark.train
def test_model_card_records_base_method_and_training_config(exported, demo_model_path):
    card = (exported[0] / "README.md").read_text(encoding="utf-8")
    assert str(demo_model_path) in card and "Method: lora" in card
    assert "identity_name: Tuney" in card and "lora_rank: 32" in card  # the run's config.yaml
    assert "Export peak memory" in card and "✅ same greedy tokens" in card


@pytest.mark.train
def test_existing_export_is_refused_then_replaced_when_asked(exported, demo_model_path, run_dir):
    out, _ = exported
    before = (out / "README.md").read_text(encoding="utf-8")
    proc = export_cli("--model", demo_model_path, "--adapter", run_dir / "final", "--out", out)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert (out / "README.md").read_text(encoding="utf-8") == before
    plan = export.plan_export(str(demo_model_path), str(run_dir / "final"), str(out),
                              shard_size="5MB", overwrite=True)
    result = export.export(plan, verify_after=False, report=export.Reporter(as_json=True))
    assert result["ok"] and result["shards"] == len(list(out.glob("*.safetensors"))) < 5
    assert leftovers(out.parent) == []


def test_bf16_export_of_the_demo_model_verifies(demo_model_path, tmp_path):
    """dtype choice: bf16 halves the size; verification tolerates only rounding ties."""
    out = tmp_path / "demo-bf16"
    proc = export_cli("--model", demo_model_path, "--out", out, "--dtype", "bf16",
                      "--shard-size", "2MB")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout.splitlines()[-1])["result"]
    assert result["ok"] and result["dtype"] == "bfloat16" and result["shards"] >= 3
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


# --- every stage ------------------------------------------------------------------------------

def test_reward_model_adapter_exports_as_a_sequence_classifier(tmp_path, tmp_path_factory,
                                                               demo_model_path):
    """An rm run's adapter (with its score head) is merged into a model that plain
    AutoModelForSequenceClassification loads; verification compares scores, not tokens."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from core import models

    final = stage_run(tmp_path_factory.getbasetemp(), demo_model_path, "rm", "lora")
    out = tmp_path / "exports" / "reward"
    proc = export_cli("--model", demo_model_path, "--adapter", final, "--out", out,
                      "--shard-size", SHARD)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout.splitlines()[-1])["result"]
    assert result["ok"] and result["verified"] and result["stop_tokens"] == [], result
    assert [c["name"] for c in result["checks"]] == [
        "shards within the size limit and indexed", "reloads with transformers",
        "saved as a reward model", "same scores as the source"]
    assert len(list(out.glob("model-*.safetensors"))) >= 3 and not list(out.glob("adapter_*"))
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(plain).__name__ == "Qwen2ForSequenceClassification"
    scores = models.score_replies(plain, AutoTokenizer.from_pretrained(out), PROMPT, REPLIES)
    assert scores == pytest.approx(plain_peft_scores(final), abs=1e-4)
    assert models.is_reward_model(out)
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "AutoModelForSequenceClassification.from_pretrained" in card
    assert "reward-model" in card and "stage rm" in card and "✅ same scores" in card
    assert "AutoModelForCausalLM" not in card and leftovers(out.parent) == []


def test_bf16_reward_model_export_verifies_its_scores(tmp_path, tmp_path_factory,
                                                     demo_model_path):
    final = stage_run(tmp_path_factory.getbasetemp(), demo_model_path, "rm", "lora")
    plan = export.plan_export(str(demo_model_path), str(final), str(tmp_path / "rm-bf16"),
                              dtype="bf16")
    assert plan.head == "score"
    result = export.export(plan, report=export.Reporter(as_json=True))
    assert result["ok"] and result["dtype"] == "bfloat16", result
    # a score off by more than rounding fails the check
    import torch
    assert not export.compare_scores([1.0, -1.0], [1.0, -0.5], torch.bfloat16)["ok"]
    assert export.compare_scores([1.0, -1.0], [1.0, -1.01], torch.bfloat16)["ok"]


def test_full_reward_model_checkpoint_exports(tmp_path, tmp_path_factory, demo_model_path):
    final = stage_run(tmp_path_factory.getbasetemp(), demo_model_path, "rm", "full")
    plan = export.plan_export(str(demo_model_path), str(final), str(tmp_path / "rm-full"))
    assert plan.kind == "full" and plan.head == "score"
    result = export.export(plan, report=export.Reporter(as_json=True))
    assert result["ok"] and "same scores as the source" in {c["name"] for c in result["checks"]}


@pytest.mark.parametrize("stage", ["dpo", "kto", "grpo"])
def test_preference_and_rl_adapters_export_like_sft(stage, tmp_path, tmp_path_factory,
                                                   demo_model_path):
    """Their results are causal-LM adapters: merged and verified by greedy tokens."""
    final = stage_run(tmp_path_factory.getbasetemp(), demo_model_path, stage, "lora")
    plan = export.plan_export(str(demo_model_path), str(final), str(tmp_path / stage))
    assert plan.head == "causal"
    result = export.export(plan, report=export.Reporter(as_json=True))
    assert result["ok"], result
    assert "same greedy tokens as the source" in {c["name"] for c in result["checks"] if c["ok"]}
    assert f"stage {stage}" in (tmp_path / stage / "README.md").read_text(encoding="utf-8")


def test_export_tab_says_a_reward_model_exports_as_a_classifier(tmp_path, tmp_path_factory,
                                                                demo_model_path, monkeypatch):
    import gradio as gr
    from core import paths
    from webui import export_tab

    final = stage_run(tmp_path_factory.getbasetemp(), demo_model_path, "rm", "lora")
    sft = stage_run(tmp_path_factory.getbasetemp(), demo_model_path, "dpo", "lora")
    monkeypatch.setenv(paths.ENV_ROOTS, str(tmp_path_factory.getbasetemp()))
    with gr.Blocks():
        tab = export_tab.build(tmp_path)
    model, out, hint = tab.pick_checkpoint(str(final), "demo")
    assert "AutoModelForSequenceClassification" in hint and out.endswith("rm-lora-run-final")
    assert tab.pick_checkpoint(str(sft), "demo")[2] == ""
    assert tab.pick_checkpoint("", "demo")[2] == ""


# --- formats: rows of one registry (export.FORMATS) -------------------------------------------

def test_every_format_is_a_row_with_a_size_estimate(demo_model_path):
    from core import config as cfg
    assert tuple(export.FORMATS) == cfg.EXPORT_FORMATS
    sizes = {f: export.estimate(demo_model_path, f, "q4_k_m") for f in export.FORMATS}
    merged = sizes["safetensors"]["merged"]
    assert sizes["safetensors"]["output"] == sizes["safetensors"]["disk"] == merged
    assert 13e6 < merged < 15e6  # the demo's fp32 weights
    for kind, measured in (("bnb-4bit", 3.69e6), ("bnb-8bit", 5.11e6)):  # bnb_export's notes
        assert abs(sizes[kind]["output"] - measured) < 0.1 * measured, sizes[kind]
        assert sizes[kind]["disk"] == merged + sizes[kind]["output"]  # the merged folder too
    assert sizes["gguf"]["disk"] > merged + sizes["gguf"]["output"]  # + the 16-bit GGUF
    assert export.estimate(demo_model_path, "safetensors", dtype="bf16")["output"] == merged // 2


def test_a_missing_extra_is_refused_naming_what_to_install(monkeypatch, demo_model_path,
                                                           tmp_path):
    import importlib.util
    from core import config as cfg

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    with pytest.raises(BadInput, match=r"pip install 'tunebench\[gguf\]'"):
        cfg.export_config({"format": "gguf"})  # the CLI's and the page's settings check
    with pytest.raises(BadInput, match=r"llama_cpp.*tunebench\[gguf\]"):
        export.plan_export(str(demo_model_path), None, str(tmp_path / "x"), format="gguf")
    assert cfg.export_config({"format": "bnb-4bit"}).format == "bnb-4bit"
    assert not (tmp_path / "x").exists()


def test_disk_space_is_checked_against_the_estimate_before_loading(monkeypatch, tmp_path,
                                                                   demo_model_path):
    import collections
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(export.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 15_000_000))
    # 15 MB free: the 13.9 MB safetensors export fits; bnb-4bit needs its merged folder too
    export.check_free_space(tmp_path, export.estimate(demo_model_path)["disk"])
    plan = export.plan_export(str(demo_model_path), None, str(tmp_path / "q"), format="bnb-4bit")
    with pytest.raises(BadInput, match=r"not enough disk space: the bnb-4bit export needs "
                                       r"about 0\.02 GB .*merged model.* 0\.01 GB are free"):
        export.export(plan, report=export.Reporter(as_json=True))
    assert os.listdir(tmp_path) == []


def test_full_disk_while_quantizing_leaves_nothing(tmp_path, demo_model_path):
    """bnb writes the merged model first: a 2.5 MB file-size limit stops it there."""
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_500_000, 2_500_000))

    out = tmp_path / "exports" / "demo-4bit"
    proc = export_cli("--model", demo_model_path, "--out", out, "--format", "bnb-4bit",
                      preexec=limit_file_size)
    assert proc.returncode == 2, proc.stdout[-1500:] + proc.stderr[-1500:]
    assert "disk is full" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and leftovers(out.parent) == []


def test_bnb_4bit_export_from_the_cli_reloads_as_it_is(tmp_path, demo_model_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "demo-4bit"
    proc = export_cli("--model", demo_model_path, "--out", out, "--format", "bnb-4bit")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout.splitlines()[-1])["result"]
    assert result["ok"] and result["verified"] and result["format"] == "bnb-4bit", result
    assert result["weights"] == "nf4 4-bit (bitsandbytes)" and result["size_mb"] < 5
    assert {c["name"] for c in result["checks"]} >= {
        "greedy tokens agree with the source", "perplexity close to the source"}
    assert not (out / export.MERGED).exists() and leftovers(out.parent) == []
    model = AutoModelForCausalLM.from_pretrained(out)  # as a user loads it
    assert sum(type(m).__name__ == "Linear4bit" for m in model.modules()) == 28
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "nf4 4-bit" in card and "bitsandbytes" in card and "✅ greedy tokens agree" in card


def test_reward_model_is_refused_by_the_formats_that_generate(tmp_path, tmp_path_factory,
                                                              demo_model_path):
    final = stage_run(tmp_path_factory.getbasetemp(), demo_model_path, "rm", "lora")
    for fmt in ("bnb-8bit", "gguf"):
        with pytest.raises(BadInput, match="reward model.*export it as safetensors"):
            export.plan_export(str(demo_model_path), str(final), str(tmp_path / fmt),
                               format=fmt)
    assert os.listdir(tmp_path) == []


def test_gguf_export_through_the_registry(run_dir, demo_model_path, tmp_path):
    """The identity fine-tune merged, converted with llama.cpp's converter, verified with
    llama-cpp-python: f16 gives the source's greedy tokens; a Modelfile beside it."""
    pytest.importorskip("llama_cpp", reason="the gguf extra (llama-cpp-python) is not installed")
    out = tmp_path / "identity-gguf"
    proc = export_cli("--model", demo_model_path, "--adapter", run_dir / "final", "--out", out,
                      "--format", "gguf", "--gguf-type", "f16")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout.splitlines()[-1])["result"]
    assert result["ok"] and result["verified"] and result["weights"] == "GGUF f16", result
    checks = {c["name"]: c for c in result["checks"]}
    assert checks["same greedy tokens as the source"]["ok"]
    assert checks["Ollama Modelfile"]["detail"].startswith("TEMPLATE renders")
    assert sorted(p.name for p in out.iterdir()) == [
        "Modelfile", "README.md", "identity-gguf-f16.gguf"]
    assert "FROM ./identity-gguf-f16.gguf" in (out / "Modelfile").read_text(encoding="utf-8")
    assert "ollama create identity-gguf" in (out / "README.md").read_text(encoding="utf-8")
    assert leftovers(out.parent) == []


def test_full_disk_while_converting_to_gguf_leaves_nothing(tmp_path, demo_model_path):
    """The merged shards fit under the limit; the 7 MB f16 GGUF does not."""
    pytest.importorskip("llama_cpp", reason="the gguf extra (llama-cpp-python) is not installed")

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_500_000, 2_500_000))

    out = tmp_path / "exports" / "demo-gguf"
    proc = export_cli("--model", demo_model_path, "--out", out, "--format", "gguf",
                      "--gguf-type", "f16", "--shard-size", "2MB", preexec=limit_file_size)
    assert proc.returncode == 2, proc.stdout[-1500:] + proc.stderr[-1500:]
    assert "disk is full" in proc.stderr and "Traceback" not in proc.stderr
    progress = [json.loads(line) for line in proc.stdout.splitlines()]
    assert progress[-1]["progress"] >= 0.65  # it failed while converting
    assert not out.exists() and leftovers(out.parent) == []
