"""GGUF export of the demo model with llama.cpp's converter, verified with llama-cpp-python.

The demo model is converted once per module: f16 and q8_0 straight from the converter,
and q4_k_m (through llama_model_quantize) by the whole `export_gguf`, Modelfile included.
The demo model is tiny, so all of it takes seconds. Skipped only when llama-cpp-python
is not installed: CI installs the `gguf` extra.
"""

import json
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed "
                    "(pip install 'tunebench[gguf]')")

from core import gguf_export, ollama  # noqa: E402
from core.errors import BadInput  # noqa: E402


@pytest.fixture(scope="module")
def source(demo_model_path):
    from core.chat import stop_token_ids
    from core.models import load_checkpoint
    tokenizer, model = load_checkpoint(str(demo_model_path), dtype="fp32", device="cpu")
    stops = stop_token_ids(tokenizer, model.generation_config)
    ref = gguf_export.reference(model, tokenizer, stops)
    return {"tokenizer": tokenizer, "ref": ref, "stops": stops}


@pytest.fixture(scope="module")
def converted(demo_model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    return {kind: gguf_export.convert(demo_model_path, out / f"demo-{kind}.gguf", kind)
            for kind in ("f16", "q8_0")}


@pytest.fixture(scope="module")
def checks(converted, source):
    return {kind: {c["name"]: c for c in gguf_export.verify_gguf(
        path, source["tokenizer"], source["ref"], kind)} for kind, path in converted.items()}


@pytest.fixture(scope="module")
def exported(demo_model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf-export") / "demo-q4_k_m.gguf"
    return gguf_export.export_gguf(demo_model_path, out, "q4_k_m")


def test_export_gguf_writes_a_verified_q4_k_m_and_a_modelfile(exported):
    assert exported["ok"], exported["checks"]
    out = Path(exported["out"])
    assert out.is_file() and exported["modelfile"] == str(out.parent / "Modelfile")
    assert sorted(p.name for p in out.parent.iterdir()) == ["Modelfile", "demo-q4_k_m.gguf"]
    assert ollama.read_modelfile(exported["modelfile"])["from"] == "./demo-q4_k_m.gguf"
    names = [c["name"] for c in exported["checks"]]
    assert names == ["same tokens as transformers", "llama.cpp stops at the end-of-turn tokens",
                     "same greedy tokens as the source", "next-token agreement with the source",
                     "perplexity close to the source's"]


def test_demo_model_is_convertible(demo_model_path):
    assert gguf_export.check_convertible(demo_model_path) == "Qwen2ForCausalLM"


def test_pretokenizer_text_is_the_converters_own():
    import ast
    import inspect
    import textwrap
    conversion, _ = gguf_export.load_converter()
    source = inspect.getsource(conversion.TextModel.get_vocab_base_pre)
    tree = ast.parse(textwrap.dedent(source))
    chktxt = next(ast.literal_eval(node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Assign) and node.targets[0].id == "chktxt")
    assert gguf_export.PRETOKENIZER_TEXT == chktxt


def test_demo_tokenizer_is_recognised_as_qwen2(source):
    assert gguf_export.is_qwen2_pretokenizer(source["tokenizer"])


def test_f16_gives_the_source_greedy_tokens(checks):
    greedy = checks["f16"]["same greedy tokens as the source"]
    assert greedy["ok"], greedy["detail"]
    assert greedy["detail"].startswith("5 of 5 probe replies"), greedy["detail"]
    assert all(c["ok"] for c in checks["f16"].values()), checks["f16"]


def test_q8_0_agrees_with_the_source(checks):
    agreement = checks["q8_0"]["next-token agreement with the source"]
    perplexity = checks["q8_0"]["perplexity close to the source's"]
    assert agreement["ok"], agreement["detail"]
    assert perplexity["ok"], perplexity["detail"]


def test_verification_fails_against_another_models_replies(converted, source):
    """The checks can fail: a reference whose replies are not this model's (every token
    shifted by one) fails greedy equality and next-token agreement."""
    import copy
    ref = copy.deepcopy(source["ref"])
    for probe in ref["probes"]:
        probe["tokens"] = [(t + 1) % 2048 for t in probe["tokens"]]
    for row in ref["rows"]:
        row["argmax"] = [(t + 1) % 2048 for t in row["argmax"]]
    checks = {c["name"]: c for c in gguf_export.verify_gguf(
        converted["f16"], source["tokenizer"], ref, "f16")}
    assert not checks["same greedy tokens as the source"]["ok"]
    assert not checks["next-token agreement with the source"]["ok"]


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_tokenizer_round_trip_and_stops(checks, kind):
    for name in ("same tokens as transformers", "llama.cpp stops at the end-of-turn tokens"):
        assert checks[kind][name]["ok"], checks[kind][name]["detail"]
    assert "<|im_end|>" in checks[kind]["llama.cpp stops at the end-of-turn tokens"]["detail"]


def test_llama_cpp_tokenizes_the_chat_template_with_end_of_turn(converted, source):
    tokenizer = source["tokenizer"]
    messages = [{"role": "user", "content": "Who are you?"},
                {"role": "assistant", "content": "I am Tuney."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    llm = gguf_export.load_gguf(converted["f16"])
    try:
        got = llm.tokenize(text.encode(), add_bos=False, special=True)
    finally:
        llm.close()
    assert got == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in got


def test_refuses_an_architecture_llama_cpp_cannot_convert(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["TunebenchMadeUpForCausalLM"], "model_type": "made_up"}))
    with pytest.raises(BadInput, match="cannot convert architecture TunebenchMadeUpForCausalLM"):
        gguf_export.convert(tmp_path, tmp_path / "x.gguf", "f16")
    assert not list(tmp_path.glob("*.gguf*"))


@pytest.mark.parametrize("module", ["llama_cpp", "sentencepiece"])
def test_missing_extra_names_the_install_command(demo_model_path, tmp_path, monkeypatch, module):
    import importlib.util
    import sys
    if module == "llama_cpp":
        monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if absent
    else:
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name == module else find_spec(name, *a))
    with pytest.raises(BadInput, match=r"pip install 'tunebench\[gguf\]'"):
        gguf_export.convert(demo_model_path, tmp_path / "x.gguf", "f16")


def test_refuses_an_unknown_gguf_type(demo_model_path, tmp_path):
    with pytest.raises(BadInput, match="q4_k_m"):
        gguf_export.convert(demo_model_path, tmp_path / "x.gguf", "q3_nonsense")


# --- Ollama Modelfile -----------------------------------------------------------------

MULTI_TURN = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "Who are you?"},
              {"role": "assistant", "content": "I am Tuney."},
              {"role": "user", "content": "你是谁？"},
              {"role": "assistant", "content": "我是 Tuney。"},
              {"role": "user", "content": "Thanks!\nBye."}]


def test_modelfile_template_renders_as_the_jinja_template(converted, source):
    tokenizer = source["tokenizer"]
    stops = tokenizer.convert_ids_to_tokens(source["stops"])
    path = ollama.write_modelfile(converted["f16"], tokenizer, stops)
    modelfile = ollama.read_modelfile(path)
    assert modelfile["from"] == "./demo-f16.gguf"
    assert modelfile["parameters"]["stop"] == ['"<|im_end|>"']
    assert modelfile["parameters"]["temperature"] == ["0"]
    assert modelfile["parameters"]["num_predict"] == ["256"]
    for conversation in (MULTI_TURN, MULTI_TURN[1:]):
        want = tokenizer.apply_chat_template(conversation, tokenize=False,
                                             add_generation_prompt=True)
        assert ollama.render_go(modelfile["template"], conversation,
                                modelfile["system"]) == want


@pytest.mark.parametrize("name", ["chatml", "qwen", "alpaca", "llama3"])
def test_named_templates_become_go_templates(source, name):
    from core.templates import TEMPLATES
    tokenizer = source["tokenizer"]
    saved = tokenizer.chat_template
    tokenizer.chat_template = TEMPLATES[name].jinja
    try:
        shape = ollama.chat_shape(ollama.jinja_renderer(tokenizer))
        template = ollama.go_template(shape)
        for conversation in (MULTI_TURN, MULTI_TURN[1:]):
            want = tokenizer.apply_chat_template(conversation, tokenize=False,
                                                 add_generation_prompt=True)
            assert ollama.render_go(template, conversation, shape.default_system) == want
    finally:
        tokenizer.chat_template = saved


def test_template_that_merges_system_into_the_first_turn_is_refused(source):
    from core.templates import TEMPLATES
    tokenizer = source["tokenizer"]
    saved = tokenizer.chat_template
    tokenizer.chat_template = TEMPLATES["llama2"].jinja
    try:
        with pytest.raises(BadInput, match="cannot be written as an Ollama template"):
            ollama.chat_shape(ollama.jinja_renderer(tokenizer))
    finally:
        tokenizer.chat_template = saved


def test_unknown_pre_tokenizer_is_refused(demo_model_path):
    """GPT-2's byte-level regex instead of Qwen2's: llama.cpp knows neither this hash nor
    these rules, so the converter's pre-tokenizer lookup refuses it. (A qwen2 folder cannot
    show this end to end: transformers rebuilds Qwen2's pre-tokenizer for every qwen2
    model, whatever tokenizer.json says.)"""
    from types import SimpleNamespace

    from tokenizers import Tokenizer, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    backend = Tokenizer.from_file(str(demo_model_path / "tokenizer.json"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    other = PreTrainedTokenizerFast(tokenizer_object=backend)
    assert not gguf_export.is_qwen2_pretokenizer(other)
    conversion, _ = gguf_export.load_converter()
    cls = gguf_export.model_class(conversion, "Qwen2ForCausalLM")
    with pytest.raises(BadInput, match="pre-tokenizer"):
        cls.get_vocab_base_pre(SimpleNamespace(dir_model=demo_model_path), other)
