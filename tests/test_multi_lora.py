"""Stacked LoRA (core/multi_lora.py) against PEFT's own mixed-batch path, and the serving
decode loop (core/serve_engine.py) against transformers' `generate`, on the demo model.

The adapters are random (PEFT's `init_lora_weights=False`), with different ranks, scalings
and target modules, so every padding and zero column of the stack is exercised."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from core.multi_lora import BASE, StackedLora, stackable


def _adapter(model_path, folder, **config) -> str:
    torch.manual_seed(len(str(folder)))
    model = AutoModelForCausalLM.from_pretrained(model_path)
    peft = get_peft_model(model, LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM",
                                            **config))
    peft.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def adapters(demo_model_path, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("multi-lora")
    return {
        "wide": _adapter(demo_model_path, root / "wide", r=16, lora_alpha=32,
                         target_modules="all-linear"),
        "narrow": _adapter(demo_model_path, root / "narrow", r=4, lora_alpha=4,
                           target_modules=["q_proj", "v_proj"], use_rslora=True),
        "dora": _adapter(demo_model_path, root / "dora", r=4, target_modules=["q_proj"],
                         use_dora=True),
    }


def _served(demo_model_path, adapters: dict, names: list[str]) -> PeftModel:
    model = AutoModelForCausalLM.from_pretrained(demo_model_path).eval()
    model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    return model.eval()


def test_stacked_adapters_match_peft_row_by_row(demo_model_path, adapters):
    model = _served(demo_model_path, adapters, ["wide", "narrow"])
    assert stackable(model, ["wide", "narrow"])
    rows = ["wide", BASE, "narrow", "wide", "narrow", BASE]
    ids = torch.randint(3, 2000, (len(rows), 12))
    with torch.inference_mode():
        want = model(input_ids=ids, adapter_names=rows).logits
        stack = StackedLora(model, ["wide", "narrow"])
        stack.select(rows)
        got = model.base_model.model(input_ids=ids).logits
        stack.select([BASE] * len(rows))
        plain = model.base_model.model(input_ids=ids).logits
        stack.remove()
        again = model(input_ids=ids, adapter_names=rows).logits
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    # the adapters change the logits, so the match above says something
    assert (want[0] - plain[0]).abs().max() > 1e-2 and (want[2] - plain[2]).abs().max() > 1e-2
    assert torch.allclose(plain[1], want[1], atol=1e-4)      # a base row is the plain base
    assert torch.equal(again, want)                          # removed: PEFT's forward is back


def test_dora_is_left_to_peft(demo_model_path, adapters):
    model = _served(demo_model_path, adapters, ["wide", "dora"])
    assert not stackable(model, ["wide", "dora"])
