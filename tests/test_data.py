"""core/data.py: every format in every file type reads to the same normalized records."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core import config as cfg
from core import data
from core.errors import BadInput

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent

# --- one conversation set, written in each format ----------------------------------------

SYSTEM = "Answer briefly."
EXPECTED = [
    {"messages": [{"role": "user", "content": "Name a colour.\nSomething warm."},
                  {"role": "assistant", "content": "Orange."}]},
    {"messages": [{"role": "system", "content": SYSTEM},
                  {"role": "user", "content": "What is 2 + 2?"},
                  {"role": "assistant", "content": "4."},
                  {"role": "user", "content": "And times 3?"},
                  {"role": "assistant", "content": "12."}]},
    {"messages": [{"role": "user", "content": "你是谁？"},
                  {"role": "assistant", "content": "我是 {{name}}，由 {{author}} 开发。"}]},
]
TEXTS = ["The first paragraph.", "第二段文字。", "A third, with \"quotes\", commas\nand a newline."]

ROWS = {
    "alpaca": [
        {"instruction": "Name a colour.", "input": "Something warm.", "output": "Orange.",
         "system": "", "history": []},
        {"instruction": "And times 3?", "input": "", "output": "12.", "system": SYSTEM,
         "history": [["What is 2 + 2?", "4."]]},
        {"instruction": "你是谁？", "input": "", "output": "我是 {{name}}，由 {{author}} 开发。",
         "system": "", "history": []},
    ],
    "sharegpt": [
        {"conversations": [{"from": "human", "value": "Name a colour.\nSomething warm."},
                           {"from": "gpt", "value": "Orange."}]},
        {"conversations": [{"from": "system", "value": SYSTEM},
                           {"from": "human", "value": "What is 2 + 2?"},
                           {"from": "gpt", "value": "4."},
                           {"from": "human", "value": "And times 3?"},
                           {"from": "gpt", "value": "12."}]},
        {"conversations": [{"from": "human", "value": "你是谁？"},
                           {"from": "gpt", "value": "我是 {{name}}，由 {{author}} 开发。"}]},
    ],
    "openai": [{"messages": r["messages"]} for r in EXPECTED],
    "text": [{"text": t} for t in TEXTS],
}
# BELLE: sharegpt with an id and human/assistant speakers
ROWS["belle"] = [{"id": f"b{i}", "conversations": [
    {"from": {"gpt": "assistant"}.get(m["from"], m["from"]), "value": m["value"]}
    for m in row["conversations"]]} for i, row in enumerate(ROWS["sharegpt"])]
# dolly: instruction/context/response (no system or history)
DOLLY = [{"instruction": "Name a colour.", "context": "Something warm.", "response": "Orange.",
          "category": "open_qa"},
         {"instruction": "你是谁？", "context": "", "response": "我是 {{name}}，由 {{author}} 开发。",
          "category": "open_qa"}]
FORMAT_OF = {"alpaca": "alpaca", "sharegpt": "sharegpt", "belle": "sharegpt", "openai": "openai",
             "text": "text"}


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Write rows as .json, .jsonl, .csv (lists JSON-encoded in cells) or .parquet."""
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                        encoding="utf-8")
    elif path.suffix == ".csv":
        with path.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
                              for k, v in r.items()} for r in rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("ext", data.EXTENSIONS)
@pytest.mark.parametrize("layout", sorted(FORMAT_OF))
def test_every_format_in_every_file_type_reads_the_same(tmp_path, layout, ext):
    path = write_rows(tmp_path / f"{layout}{ext}", ROWS[layout])
    stage = "pt" if layout == "text" else "sft"
    records, fmt = data.read_dataset(str(path), stage=stage)
    assert fmt == FORMAT_OF[layout]
    assert records == ([{"text": t} for t in TEXTS] if layout == "text" else EXPECTED)


@pytest.mark.parametrize("ext", data.EXTENSIONS)
def test_dolly_columns_through_registry_and_detection(tmp_path, ext):
    write_rows(tmp_path / f"dolly{ext}", DOLLY)
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": {
        "file_name": f"dolly{ext}", "formatting": "alpaca",
        "columns": {"prompt": "instruction", "query": "context", "response": "response"}}}))
    expected = [EXPECTED[0], EXPECTED[2]]
    assert data.read_dataset("d", dataset_dir=str(tmp_path)) == (expected, "alpaca")
    # without the registry the dolly layout is recognised from its columns
    assert data.read_dataset(str(tmp_path / f"dolly{ext}")) == (expected, "alpaca")


def test_registry_columns_without_formatting_detect_through_the_mapping(tmp_path):
    write_rows(tmp_path / "qa.jsonl", [{"q": "Name a colour.", "a": "Orange."}])
    (tmp_path / "dataset_info.json").write_text(json.dumps({"qa": {
        "file_name": "qa.jsonl", "columns": {"prompt": "q", "response": "a"}}}))
    records, fmt = data.read_dataset("qa", dataset_dir=str(tmp_path))
    assert fmt == "alpaca"
    assert records[0]["messages"][1] == {"role": "assistant", "content": "Orange."}


@pytest.mark.parametrize("keys, fmt", [
    ({"messages": 1}, "openai"), ({"conversations": 1}, "sharegpt"),
    ({"instruction": 1, "output": 1}, "alpaca"), ({"instruction": 1, "response": 1}, "alpaca"),
    ({"prompt": 1, "completion": 1}, "alpaca"), ({"text": 1}, "text"),
    ({"question": 1, "answer": 1}, None)])
def test_detect_by_keys(keys, fmt):
    found = data._detect(set(keys))
    assert (found[0] if found else None) == fmt


def test_prompt_completion_and_openai_content_parts(tmp_path):
    path = write_rows(tmp_path / "pc.jsonl", [{"prompt": "Hi", "completion": "Hello!"}])
    assert data.read_dataset(str(path))[0] == [{"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}]
    parts = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                           {"role": "assistant", "content": "Hello!"}]}]
    path = write_rows(tmp_path / "parts.jsonl", parts)
    assert data.read_dataset(str(path))[0][0]["messages"][0]["content"] == "Hi"


def test_tool_turns_keep_alternation(tmp_path):
    rows = [{"conversations": [
        {"from": "human", "value": "Weather in Oslo?"},
        {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Oslo"}}'},
        {"from": "observation", "value": '{"temp": 3}'},
        {"from": "gpt", "value": "It is 3 °C in Oslo."}]}]
    records, _ = data.read_dataset(str(write_rows(tmp_path / "tools.json", rows)))
    assert [m["role"] for m in records[0]["messages"]] == ["user", "assistant", "user",
                                                           "assistant"]


def test_empty_system_prompt_is_dropped_and_top_level_system_used(tmp_path):
    rows = [{"system": "Be kind.", "conversations": [{"from": "human", "value": "a"},
                                                     {"from": "gpt", "value": "b"}]},
            {"conversations": [{"from": "system", "value": " "}, {"from": "human", "value": "a"},
                               {"from": "gpt", "value": "b"}]}]
    records, _ = data.read_dataset(str(write_rows(tmp_path / "sys.jsonl", rows)))
    assert records[0]["messages"][0] == {"role": "system", "content": "Be kind."}
    assert [m["role"] for m in records[1]["messages"]] == ["user", "assistant"]


def test_placeholders_filled(tmp_path):
    path = write_rows(tmp_path / "id.json", ROWS["alpaca"])
    records, _ = data.read_dataset(str(path), identity=("Tuney", "Acme Labs"))
    assert records[2]["messages"][1]["content"] == "我是 Tuney，由 Acme Labs 开发。"
    raw, _ = data.read_dataset(str(path))  # no identity: left as written
    assert "{{name}}" in raw[2]["messages"][1]["content"]
    assert data.fill_placeholders("{{ name }} by {{author}}", ("N", "A")) == "N by A"


def test_chat_records_become_text_for_pt(tmp_path):
    path = write_rows(tmp_path / "chat.jsonl", ROWS["sharegpt"])
    records, fmt = data.read_dataset(str(path), stage="pt", identity=("N", "A"))
    assert fmt == "sharegpt"
    assert records[0] == {"text": "Name a colour.\nSomething warm.\n\nOrange."}
    assert records[2] == {"text": "你是谁？\n\n我是 N，由 A 开发。"}


# --- bundled data ------------------------------------------------------------------------

def test_bundled_datasets_all_read():
    names = data.list_datasets()
    assert {"identity", "alpaca_demo", "sharegpt_demo", "belle_demo", "openai_demo",
            "dolly_demo", "text_demo", "parquet_chat_demo"} <= set(names)
    registry = data.read_registry()
    formats = set()
    for name in names:
        kind = data.dataset_kind(name)
        if kind in data.EVAL_KINDS:  # multiple choice: read for evaluation, not training
            (_, records), fmt = data.read_choice(name), "choice"
        else:
            records, fmt = data.read_dataset(name, stage=data.KIND_STAGE[kind],
                                             identity=("N", "A"))
        assert 20 <= len(records) <= 100, name
        assert registry[name].get("description"), name
        formats.add(fmt)
    assert formats == set(data.FORMATS)
    size = sum(p.stat().st_size for p in (REPO / "data").rglob("*") if p.is_file())
    assert size < 300 * 1024


def test_identity_dataset_is_bilingual_and_has_who_are_you():
    records, _ = data.read_dataset("identity", identity=("Tuney", "Acme"))
    prompts = [r["messages"][-2]["content"] for r in records]
    answers = [r["messages"][-1]["content"] for r in records]
    assert 60 <= len(records) <= 90 and "Who are you?" in prompts
    chinese = sum(any("\u4e00" <= ch <= "\u9fff" for ch in p) for p in prompts)
    assert 0.25 <= chinese / len(records) <= 0.45
    assert all("Tuney" in a and "Acme" in a and "{{" not in a for a in answers)


def test_load_records_applies_max_samples_per_dataset_and_identity():
    config = cfg.from_mapping({"dataset": ["identity", "alpaca_demo"], "max_samples": 5,
                               "identity_name": "Zed", "identity_author": "Qux"})
    records = data.load_records(config)
    assert len(records) == 10
    assert records[0]["messages"][-1]["content"].startswith("I am Zed") and \
        "Qux" in records[0]["messages"][-1]["content"]
    config = cfg.from_mapping({"dataset": ["text_demo", "identity"], "stage": "pt"})
    records = data.load_records(config)
    assert len(records) == 30 + 68 and all(list(r) == ["text"] for r in records)


def test_bundled_data_found_from_another_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "identity" in data.list_datasets()
    assert len(data.read_dataset("identity")[0]) == 68


def test_paths_resolve_relative_to_dataset_dir(tmp_path):
    write_rows(tmp_path / "mine.jsonl", ROWS["openai"])
    records, _ = data.read_dataset("mine.jsonl", dataset_dir=str(tmp_path))
    assert records == EXPECTED


# --- uploads -----------------------------------------------------------------------------

def test_register_file_copies_validates_and_registers(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "dataset_info.json").write_text(json.dumps({"old": {"file_name": "x.json"}}))
    upload = write_rows(tmp_path / "My Data (v2).csv", DOLLY)
    name = data.register_file(upload, dataset_dir=str(folder))
    assert name == "My_Data_v2"
    registry = json.loads((folder / "dataset_info.json").read_text())
    assert list(registry) == ["old", name]  # existing entries kept, in order
    assert registry[name]["file_name"] == "uploads/My_Data_v2.csv"
    assert registry[name]["formatting"] == "alpaca"
    assert (folder / "uploads" / "My_Data_v2.csv").read_bytes() == upload.read_bytes()
    assert data.read_dataset(name, dataset_dir=str(folder))[0] == [EXPECTED[0], EXPECTED[2]]
    # the same file again gets a fresh name; an explicit name that is taken is refused
    assert data.register_file(upload, dataset_dir=str(folder)) == "My_Data_v2-2"
    assert (folder / "uploads" / "My_Data_v2-2.csv").is_file()
    with pytest.raises(BadInput, match="already registered"):
        data.register_file(upload, dataset_dir=str(folder), name="old")
    assert data.register_file(upload, dataset_dir=str(folder), name="../evil name") == "evil_name"
    assert not list(folder.glob("uploads/*.partial"))  # no partial copies left


def test_register_file_refuses_malformed_without_side_effects(tmp_path):
    folder = tmp_path / "d"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": [{"from": "gpt", "value": "first"}]}\n')
    with pytest.raises(BadInput, match=r"bad\.jsonl, record 1, field 'conversations'"):
        data.register_file(bad, dataset_dir=str(folder))
    assert not folder.exists()  # nothing copied, nothing registered


# --- tunebench data check ----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny ChatML model folder (tokenizer + 2-layer Qwen2) built offline in seconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    folder = tmp_path_factory.mktemp("tiny-model")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [json.dumps(r, ensure_ascii=False) for r in ROWS["alpaca"]] * 5
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                          "<|im_end|>\n{% endfor %}"
                          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast.save_pretrained(folder)
    config = Qwen2Config(vocab_size=len(fast), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    return folder


def _check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "webui.cli", "data", "check", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=180,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_cli_data_check_marks_trained_tokens(tiny_model):
    proc = _check("identity", "--model", str(tiny_model))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "records: 68" in out and "format:  alpaca" in out
    # the first example, as the model sees it: prompt plain, reply marked, placeholders filled
    assert "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n⟦I am Tuney" in out
    assert "developed by the tunebench team. How can I help you today?<|im_end|>\n⟧" in out
    assert "trained tokens:" in out
    assert "tokens per example (all 68): min" in out and "longer than cutoff_len 1024" in out


def test_cli_data_check_plain_text_file(tiny_model, tmp_path):
    path = write_rows(tmp_path / "notes.jsonl", [{"text": t} for t in TEXTS])
    proc = _check(str(path), "--model", str(tiny_model))
    assert proc.returncode == 0, proc.stderr
    assert "format:  text (detected)" in proc.stdout and "⟦The first paragraph." in proc.stdout


def test_cli_data_check_without_tokenizer():
    proc = _check("openai_demo", "--model", "none")
    assert proc.returncode == 0, proc.stderr
    assert "records: 22" in proc.stdout and '"role": "system"' in proc.stdout


def test_terminal_marks_trained_text_in_green():
    class Tty:
        encoding = "utf-8"

        def isatty(self):
            return True
    marks = data._marker(Tty())
    assert data._marked([("prompt ", False), ("reply", True)], marks) == \
        "prompt \x1b[1;32mreply\x1b[0m"


def test_excel_style_csv_with_bom_and_crlf(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("instruction,input,output\r\nName a colour.,Something warm.,Orange.\r\n"
                     .encode("utf-8-sig"))
    assert data.read_dataset(str(path)) == ([EXPECTED[0]], "alpaca")
