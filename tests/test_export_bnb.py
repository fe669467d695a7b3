"""bitsandbytes export (--format bnb-4bit / bnb-8bit) of the demo model on the CPU: the
folder reloads with plain from_pretrained (its quantization_config in config.json) and
agrees with the source; a broken one is caught; a missing bitsandbytes is a clear error."""

import json
import shutil

import pytest

from core import bnb_export, export
from core.errors import BadInput

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def source(demo_model_path):
    """The source's greedy reference turn and per-row losses, taken before it is freed (as
    export does), and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.chat import stop_token_ids

    tokenizer = AutoTokenizer.from_pretrained(demo_model_path)
    model = AutoModelForCausalLM.from_pretrained(demo_model_path, dtype=torch.float32)
    reference = export.greedy_turn(model, tokenizer,
                                   stop_token_ids(tokenizer, model.generation_config))
    rows = bnb_export.reference_rows(model, tokenizer)
    return reference, rows, tokenizer


def failed(checks):
    return [f"{c['name']}: {c['detail']}" for c in checks if not c["ok"]]


@pytest.mark.parametrize("kind, layer", [("bnb-4bit", "Linear4bit"), ("bnb-8bit", "Linear8bitLt")])
def test_quantized_export_reloads_and_agrees(kind, layer, demo_model_path, source, tmp_path):
    from transformers import AutoModelForCausalLM

    reference, rows, tokenizer = source
    out = tmp_path / kind
    info = bnb_export.quantize_folder(demo_model_path, out, kind)

    config = json.loads((out / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "bitsandbytes"
    assert quant["load_in_4bit" if kind == "bnb-4bit" else "load_in_8bit"] is True
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "generation_config.json", "model.safetensors"):
        assert (out / name).is_file(), name
    source_mb = (demo_model_path / "model.safetensors").stat().st_size / 1e6
    assert info["size_mb"] < 0.5 * source_mb  # 3.7 (4-bit) and 5.1 MB (8-bit) of 13.9

    # as a user loads it: no quantization_config, no device_map
    model = AutoModelForCausalLM.from_pretrained(out)
    linears = [type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__]
    assert linears.count(layer) == 28  # 7 projections x 4 layers; the tied lm_head stays
    del model

    checks = bnb_export.verify_quantized(out, reference, tokenizer, rows)
    assert [c["name"] for c in checks] == [
        "reloads with plain from_pretrained",
        "generation config stops at the template's stop tokens",
        "greedy tokens agree with the source",
        "generation stops at eos", "perplexity close to the source"]
    assert not failed(checks)


def test_a_broken_quantized_export_fails_verification(demo_model_path, source, tmp_path):
    """Layers 0 and 3 swapped in the saved weights: it still reloads, but no longer agrees."""
    from safetensors.torch import load_file, save_file

    reference, rows, tokenizer = source
    out = tmp_path / "broken"
    bnb_export.quantize_folder(demo_model_path, out, "bnb-4bit")
    weights = load_file(out / "model.safetensors")
    swapped = {}
    for key, value in weights.items():
        other = key.replace("layers.0.", "layers.3.") if "layers.0." in key else \
            key.replace("layers.3.", "layers.0.")
        swapped[other] = value
    save_file(swapped, out / "model.safetensors", metadata={"format": "pt"})

    checks = bnb_export.verify_quantized(out, reference, tokenizer, rows)
    assert checks[0]["ok"]  # reloads
    problems = failed(checks)
    assert any("greedy tokens agree" in p for p in problems)
    assert any("perplexity close" in p for p in problems)


def test_a_folder_saved_without_quantization_is_refused(demo_model_path, source, tmp_path):
    reference, rows, tokenizer = source
    out = tmp_path / "plain"
    shutil.copytree(demo_model_path, out)
    checks = bnb_export.verify_quantized(out, reference, tokenizer, rows)
    assert len(checks) == 1 and not checks[0]["ok"]
    assert "unquantized" in checks[0]["detail"]


def test_check_available_says_what_is_missing(monkeypatch):
    from transformers.utils import import_utils

    bnb_export.check_available("bnb-4bit")  # installed, and runs on this CPU
    bnb_export.check_available("bnb-8bit")
    with pytest.raises(BadInput, match="bnb-4bit, bnb-8bit"):
        bnb_export.check_available("gguf")
    monkeypatch.setattr(import_utils, "is_bitsandbytes_available", lambda *a, **k: False)
    with pytest.raises(BadInput, match=r"pip install 'bitsandbytes>=\d"):
        bnb_export.check_available("bnb-4bit")


def test_kernels_that_fail_here_are_reported(monkeypatch):
    def broken(kind):
        raise RuntimeError("no kernel for cpu")

    monkeypatch.setattr(bnb_export, "_smoke_test", broken)
    with pytest.raises(BadInput, match="cannot run bnb-8bit on this machine's CPU.*no kernel"):
        bnb_export.check_available("bnb-8bit")
