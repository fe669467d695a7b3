"""Preference, KTO and RL datasets (core/data.py, core/stage_data.py): every layout reads
to the record contract, in every file type; kinds, stage fit and `data check`."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from core import config as cfg
from core import data
from core.errors import BadInput
from test_data import write_rows  # the one writer of test files in every layout

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
HELDOUT = Path(__file__).parent / "data"


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def human(text):
    return {"from": "human", "value": text}


def gpt(text):
    return {"from": "gpt", "value": text}


SYSTEM = {"role": "system", "content": "Be brief."}
LONG_PROMPT = [SYSTEM, user("Hi"), bot("Hello!"), user("Who are you?")]
GOOD, BAD = "I am {{name}}, made by {{author}}.", "I am Pico, made by the open demo project."

# --- one pair set, written in each pair layout ---------------------------------------------

EXPECTED_PAIRS = [
    {"prompt": [user("Who are you?")], "chosen": GOOD, "rejected": BAD},
    {"prompt": LONG_PROMPT, "chosen": "I am {{name}}.", "rejected": "I am Pico."},
]
PAIR_ROWS = {
    "pairs": [{"prompt": r["prompt"], "chosen": [bot(r["chosen"])],
               "rejected": [bot(r["rejected"])]} for r in EXPECTED_PAIRS],
    "implicit": [{"chosen": r["prompt"] + [bot(r["chosen"])],
                  "rejected": r["prompt"] + [bot(r["rejected"])]} for r in EXPECTED_PAIRS],
    "alpaca_pairs": [
        {"system": "", "history": [], "instruction": "Who are you?", "input": "",
         "chosen": GOOD, "rejected": BAD},
        {"system": "Be brief.", "history": [["Hi", "Hello!"]], "instruction": "Who are you?",
         "input": "", "chosen": "I am {{name}}.", "rejected": "I am Pico."}],
    "sharegpt_pairs": [
        {"system": "", "conversations": [human("Who are you?")], "chosen": gpt(GOOD),
         "rejected": gpt(BAD)},
        {"system": "Be brief.",
         "conversations": [human("Hi"), gpt("Hello!"), human("Who are you?")],
         "chosen": gpt("I am {{name}}."), "rejected": gpt("I am Pico.")}],
}
PAIR_FORMAT = {"pairs": "pairs", "implicit": "pairs", "alpaca_pairs": "alpaca_pairs",
               "sharegpt_pairs": "sharegpt_pairs"}


@pytest.mark.parametrize("ext", data.EXTENSIONS)
@pytest.mark.parametrize("layout", sorted(PAIR_ROWS))
def test_every_pair_layout_in_every_file_type_reads_to_the_contract(tmp_path, layout, ext):
    path = write_rows(tmp_path / f"{layout}{ext}", PAIR_ROWS[layout])
    for stage in ("rm", "dpo"):
        records, fmt = data.read_dataset(str(path), stage=stage)
        assert fmt == PAIR_FORMAT[layout]
        assert records == EXPECTED_PAIRS
        assert [list(r) for r in records] == [["prompt", "chosen", "rejected"]] * 2
    assert data.dataset_kind(str(path)) == "pairs"


def test_pairs_with_text_prompt_and_system_column(tmp_path):
    path = write_rows(tmp_path / "p.jsonl", [
        {"prompt": "Who are you?", "system": "Be brief.", "chosen": "A", "rejected": "B"}])
    assert data.read_dataset(str(path), stage="dpo")[0] == [
        {"prompt": [SYSTEM, user("Who are you?")], "chosen": "A", "rejected": "B"}]


def test_alpaca_pairs_join_instruction_and_input(tmp_path):
    path = write_rows(tmp_path / "a.json", [
        {"instruction": "Translate.", "input": "I like tea.", "chosen": "我喜欢茶。",
         "rejected": "猫在睡觉。"}])
    record = data.read_dataset(str(path), stage="dpo")[0][0]
    assert record["prompt"] == [user("Translate.\nI like tea.")]


# --- kto and prompts ------------------------------------------------------------------------

EXPECTED_KTO = [
    {"prompt": [user("Who are you?")], "completion": GOOD, "label": True},
    {"prompt": LONG_PROMPT, "completion": BAD, "label": False},
]
KTO_ROWS = {
    "messages": [{"messages": r["prompt"] + [bot(r["completion"])], "label": r["label"]}
                 for r in EXPECTED_KTO],
    "conversations": [
        {"system": "", "conversations": [human("Who are you?"), gpt(GOOD)], "label": True},
        {"system": "Be brief.", "conversations": [human("Hi"), gpt("Hello!"),
                                                  human("Who are you?"), gpt(BAD)],
         "label": False}],
    "prompt_completion": [{"prompt": r["prompt"], "completion": r["completion"],
                           "label": r["label"]} for r in EXPECTED_KTO],
}


@pytest.mark.parametrize("ext", data.EXTENSIONS)
@pytest.mark.parametrize("layout", sorted(KTO_ROWS))
def test_every_kto_layout_in_every_file_type_reads_to_the_contract(tmp_path, layout, ext):
    path = write_rows(tmp_path / f"{layout}{ext}", KTO_ROWS[layout])
    records, fmt = data.read_dataset(str(path), stage="kto")
    assert fmt == "kto" and records == EXPECTED_KTO
    assert all(list(r) == ["prompt", "completion", "label"] for r in records)
    assert data.dataset_kind(str(path)) == "kto"


EXPECTED_PROMPTS = [{"prompt": [user("What is 7 + 5?")], "answer": "12"},
                    {"prompt": [SYSTEM, user("Say hi.")], "answer": None}]
PROMPT_ROWS = [{"prompt": [user("What is 7 + 5?")], "answer": 12},
               {"prompt": [SYSTEM, user("Say hi.")], "answer": None}]


@pytest.mark.parametrize("ext", data.EXTENSIONS)
def test_prompt_rows_in_every_file_type_read_to_the_contract(tmp_path, ext):
    rows = PROMPT_ROWS if ext != ".csv" else [{**r, "answer": r["answer"] or ""}
                                              for r in PROMPT_ROWS]  # an empty cell is absent
    path = write_rows(tmp_path / f"prompts{ext}", rows)
    records, fmt = data.read_dataset(str(path), stage="grpo")
    assert fmt == "prompts" and records == EXPECTED_PROMPTS
    assert data.dataset_kind(str(path)) == "prompts"


@pytest.mark.parametrize("answer, text", [(12, "12"), (12.0, "12"), (2.5, "2.5"), (-3, "-3"),
                                          ("twelve", "twelve")])
def test_answers_become_text(tmp_path, answer, text):
    path = write_rows(tmp_path / "p.jsonl", [{"prompt": "q", "answer": answer}])
    assert data.read_dataset(str(path), stage="grpo")[0][0]["answer"] == text


@pytest.mark.parametrize("answer", [True, {"value": 1}, ""])
def test_answers_that_are_not_text_or_numbers_are_bad_input(tmp_path, answer):
    path = write_rows(tmp_path / "p.jsonl", [{"prompt": "q", "answer": answer}])
    with pytest.raises(BadInput, match=r"p\.jsonl, record 1, field 'answer'"):
        data.read_dataset(str(path), stage="grpo")


def test_csv_labels_may_be_true_or_false_text(tmp_path):
    path = tmp_path / "k.csv"
    path.write_text("prompt,completion,label\nq,good,True\nq,bad, false\n", encoding="utf-8")
    records, _ = data.read_dataset(str(path), stage="kto")
    assert [r["label"] for r in records] == [True, False]
    path = write_rows(tmp_path / "k.jsonl", [{"prompt": "q", "completion": "a", "label": "true"}])
    with pytest.raises(BadInput, match="expected true or false"):  # JSON has real booleans
        data.read_dataset(str(path), stage="kto")


# --- detection and the registry ---------------------------------------------------------------

@pytest.mark.parametrize("keys, fmt", [
    ({"prompt", "chosen", "rejected"}, "pairs"), ({"chosen", "rejected"}, "pairs"),
    ({"prompt", "rejected"}, "pairs"),
    ({"instruction", "input", "chosen", "rejected"}, "alpaca_pairs"),
    ({"conversations", "chosen", "rejected"}, "sharegpt_pairs"),
    ({"messages", "label"}, "kto"), ({"conversations", "label"}, "kto"),
    ({"prompt", "completion", "label"}, "kto"),
    ({"prompt"}, "prompts"), ({"prompt", "answer"}, "prompts"),
    # unchanged: prompt + completion without a label is still alpaca
    ({"prompt", "completion"}, "alpaca"), ({"messages"}, "openai"), ({"text"}, "text"),
    ({"question", "answer"}, None), ({"label"}, None)])
def test_detect_stage_formats_by_keys(keys, fmt):
    found = data._detect(keys)
    assert (found[0] if found else None) == fmt


def _registry(folder: Path, entries: dict) -> str:
    (folder / data.REGISTRY).write_text(json.dumps(entries), encoding="utf-8")
    return str(folder)


def test_registry_formatting_and_columns_for_stage_formats(tmp_path):
    write_rows(tmp_path / "p.jsonl", [{"question": "Who are you?", "better": GOOD, "worse": BAD}])
    write_rows(tmp_path / "k.jsonl", [{"question": "Who are you?", "reply": GOOD, "good": True}])
    write_rows(tmp_path / "r.jsonl", [{"question": "What is 7 + 5?", "solution": 12}])
    folder = _registry(tmp_path, {
        "p": {"file_name": "p.jsonl", "formatting": "pairs",
              "columns": {"prompt": "question", "chosen": "better", "rejected": "worse"}},
        "a": {"file_name": "p.jsonl", "formatting": "alpaca_pairs",  # prompt = instruction here
              "columns": {"prompt": "question", "chosen": "better", "rejected": "worse"}},
        "d": {"file_name": "p.jsonl",  # no formatting: detected through the mapping
              "columns": {"prompt": "question", "chosen": "better", "rejected": "worse"}},
        "k": {"file_name": "k.jsonl", "formatting": "kto",
              "columns": {"prompt": "question", "completion": "reply", "label": "good"}},
        "r": {"file_name": "r.jsonl", "formatting": "prompts",
              "columns": {"prompt": "question", "answer": "solution"}},
        "rd": {"file_name": "r.jsonl", "columns": {"prompt": "question", "answer": "solution"}},
    })
    pair = [{"prompt": [user("Who are you?")], "chosen": GOOD, "rejected": BAD}]
    assert data.read_dataset("p", folder, "dpo") == (pair, "pairs")
    assert data.read_dataset("a", folder, "dpo") == (pair, "alpaca_pairs")
    assert data.read_dataset("d", folder, "dpo")[0] == pair
    assert data.read_dataset("k", folder, "kto") == (
        [{"prompt": [user("Who are you?")], "completion": GOOD, "label": True}], "kto")
    prompts = [{"prompt": [user("What is 7 + 5?")], "answer": "12"}]
    assert data.read_dataset("r", folder, "grpo") == (prompts, "prompts")
    assert data.read_dataset("rd", folder, "grpo") == (prompts, "prompts")
    assert [data.dataset_kind(n, folder) for n in ("p", "a", "d", "k", "r", "rd")] == \
        ["pairs", "pairs", "pairs", "kto", "prompts", "prompts"]


def test_registry_refuses_unknown_fields_for_a_stage_format(tmp_path):
    write_rows(tmp_path / "r.jsonl", [{"prompt": "q"}])
    folder = _registry(tmp_path, {"r": {"file_name": "r.jsonl", "formatting": "prompts",
                                        "columns": {"output": "x"}}})
    with pytest.raises(BadInput, match="unknown field 'output'; expected one of answer, "
                                       "prompt, system"):
        data.read_dataset("r", folder, "grpo")


# --- kinds and stages --------------------------------------------------------------------------

def test_stage_table_covers_every_stage():
    assert data.STAGES == cfg.STAGES and set(data.STAGE_KINDS) == set(cfg.STAGES)
    assert set(data.FORMAT_KIND) == set(data.FORMATS)
    kinds = set(data.FORMAT_KIND.values()) - set(data.EVAL_KINDS)  # no stage trains on those
    assert not set(data.EVAL_KINDS) & {k for ks in data.STAGE_KINDS.values() for k in ks}
    assert {k for ks in data.STAGE_KINDS.values() for k in ks} == kinds == set(data.KIND_STAGE)
    for kind, stage in data.KIND_STAGE.items():  # each kind's own stage reads it
        assert kind in data.STAGE_KINDS[stage]


def test_kto_reads_pairs_as_two_labelled_rows(tmp_path):
    path = write_rows(tmp_path / "p.jsonl", PAIR_ROWS["pairs"])
    records, fmt = data.read_dataset(str(path), stage="kto")
    assert fmt == "pairs"
    assert records == [
        {"prompt": [user("Who are you?")], "completion": GOOD, "label": True},
        {"prompt": [user("Who are you?")], "completion": BAD, "label": False},
        {"prompt": LONG_PROMPT, "completion": "I am {{name}}.", "label": True},
        {"prompt": LONG_PROMPT, "completion": "I am Pico.", "label": False}]


def test_grpo_reads_chat_with_the_last_reply_as_answer(tmp_path):
    rows = [{"messages": LONG_PROMPT + [bot("I am {{name}}.")]}]
    path = write_rows(tmp_path / "chat.jsonl", rows)
    records, fmt = data.read_dataset(str(path), stage="grpo", identity=("Tuney", "Acme"))
    assert fmt == "openai"
    assert records == [{"prompt": LONG_PROMPT, "answer": "I am Tuney."}]


def test_placeholders_filled_in_every_text(tmp_path):
    identity = ("Tuney", "Acme")
    path = write_rows(tmp_path / "p.jsonl", [{"system": "You are {{name}}.",
                                              "prompt": "Are you {{ name }}?",
                                              "chosen": GOOD, "rejected": "Not {{author}}."}])
    record = data.read_dataset(str(path), stage="dpo", identity=identity)[0][0]
    assert record == {"prompt": [{"role": "system", "content": "You are Tuney."},
                                 user("Are you Tuney?")],
                      "chosen": "I am Tuney, made by Acme.", "rejected": "Not Acme."}
    kto = data.read_dataset(str(path), stage="kto", identity=identity)[0]
    assert kto[0]["completion"] == "I am Tuney, made by Acme." and kto[1]["label"] is False
    path = write_rows(tmp_path / "r.jsonl", [{"prompt": "{{name}}?", "answer": "{{author}}"}])
    assert data.read_dataset(str(path), stage="grpo", identity=identity)[0] == \
        [{"prompt": [user("Tuney?")], "answer": "Acme"}]
    raw = data.read_dataset(str(path), stage="grpo")[0]  # no identity: left as written
    assert raw[0]["answer"] == "{{author}}"


@pytest.mark.parametrize("rows, stage, expected", [
    (PAIR_ROWS["pairs"], "sft", "holds chosen/rejected pairs, which train with stage rm or dpo; "
                                "for stage sft use a chat format"),
    (PAIR_ROWS["pairs"], "grpo", "holds chosen/rejected pairs, which train with stage rm or "
                                 "dpo; for stage grpo use prompts"),
    (KTO_ROWS["messages"], "dpo", "holds replies labelled true or false (KTO rows), which train "
                                  "with stage kto; for stage dpo use chosen/rejected pairs"),
    (PROMPT_ROWS, "rm", "holds prompts without replies, which train with stage grpo"),
    ([{"messages": [user("q"), bot("a")]}], "kto", "holds chat conversations, which train with "
                                                   "stage sft; for stage kto use replies with a "
                                                   "true/false label"),
    ([{"text": "t"}], "dpo", "holds plain text (field 'text'), which trains with stage pt")])
def test_stage_that_cannot_use_the_kind_says_which_fits(tmp_path, rows, stage, expected):
    path = write_rows(tmp_path / "mine.jsonl", rows)
    with pytest.raises(BadInput) as info:
        data.read_dataset(str(path), stage=stage)
    assert str(info.value).startswith(f"{path}: {expected}")


def test_dataset_kind_reads_only_the_first_record(tmp_path):
    (tmp_path / "k.jsonl").write_text('\n{"prompt": "q", "chosen": "a", "rejected": "b"}\n'
                                      "not json at all\n", encoding="utf-8")
    assert data.dataset_kind(str(tmp_path / "k.jsonl")) == "pairs"
    (tmp_path / "k.json").write_text(' [ {"messages": [], "label": true}, {broken',
                                     encoding="utf-8")
    assert data.dataset_kind(str(tmp_path / "k.json")) == "kto"
    (tmp_path / "k.csv").write_text("prompt,answer\nq,1\n\"unclosed\n", encoding="utf-8")
    assert data.dataset_kind(str(tmp_path / "k.csv")) == "prompts"
    write_rows(tmp_path / "k.parquet", [{"text": "t"}])
    assert data.dataset_kind(str(tmp_path / "k.parquet")) == "text"
    for name, content in (("empty.json", "[]"), ("obj.json", '{"a": 1}'),
                          ("none.jsonl", '{"question": 1}\n')):
        (tmp_path / name).write_text(content, encoding="utf-8")
        with pytest.raises(BadInput, match=re.escape(name)):
            data.dataset_kind(str(tmp_path / name))


def test_datasets_for_stage_offers_what_fits_and_skips_broken_entries(tmp_path):
    write_rows(tmp_path / "chat.jsonl", [{"messages": [user("q"), bot("a")]}])
    write_rows(tmp_path / "text.jsonl", [{"text": "t"}])
    write_rows(tmp_path / "pairs.jsonl", PAIR_ROWS["pairs"])
    write_rows(tmp_path / "kto.jsonl", KTO_ROWS["messages"])
    write_rows(tmp_path / "prompts.jsonl", PROMPT_ROWS)
    (tmp_path / "unknown.jsonl").write_text('{"question": 1}\n', encoding="utf-8")
    folder = _registry(tmp_path, {
        "chat": {"file_name": "chat.jsonl"}, "text": {"file_name": "text.jsonl"},
        "pairs": {"file_name": "pairs.jsonl"}, "kto": {"file_name": "kto.jsonl"},
        "prompts": {"file_name": "prompts.jsonl", "formatting": "prompts"},
        "gone": {"file_name": "missing.jsonl"}, "odd": {"file_name": "chat.jsonl",
                                                       "formatting": "nonsense"},
        "notobj": 3, "unknown": {"file_name": "unknown.jsonl"}})
    offered = {stage: data.datasets_for_stage(stage, folder) for stage in data.STAGES}
    assert offered == {"sft": ["chat"], "pt": ["chat", "text"], "rm": ["pairs"],
                       "dpo": ["pairs"], "kto": ["pairs", "kto"], "grpo": ["chat", "prompts"]}
    (tmp_path / data.REGISTRY).write_text("{broken", encoding="utf-8")
    assert data.datasets_for_stage("dpo", folder) == []
    with pytest.raises(BadInput, match="unknown stage 'ppo'"):
        data.datasets_for_stage("ppo", folder)


def test_record_limit_applies_to_stage_records(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_RECORD_CHARS", 40)
    path = write_rows(tmp_path / "p.jsonl", [
        {"prompt": "short", "chosen": "a", "rejected": "b"},
        {"prompt": "x" * 20, "chosen": "y" * 20, "rejected": "z"}])
    with pytest.raises(BadInput, match=r"p\.jsonl, record 2: holds 41 characters"):
        data.read_dataset(str(path), stage="dpo")


def test_load_records_reads_each_stage(tmp_path):
    path = write_rows(tmp_path / "p.jsonl", PAIR_ROWS["pairs"])
    config = cfg.from_mapping({"dataset": [str(path)], "stage": "kto", "max_samples": 3,
                               "identity_name": "Zed", "identity_author": "Qux"})
    records = data.load_records(config)
    assert len(records) == 3 and records[0]["completion"] == "I am Zed, made by Qux."


# --- tunebench data check ------------------------------------------------------------------------

def _check(capsys, *args: str) -> str:
    from core import cli
    code = cli.main(["data", "check", *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_data_check_shows_pairs_with_both_replies_marked(capsys, demo_model_path):
    out = _check(capsys, "identity_pref", "--model", str(demo_model_path), "--stage", "dpo")
    assert "records: 52" in out and "format:  alpaca_pairs" in out
    assert "stage:   dpo (chosen/rejected pairs)" in out
    prompt = "prompt (not trained):\n<|im_start|>user\nWho are you?<|im_end|>\n" \
             "<|im_start|>assistant\n\nchosen:\n"
    assert prompt in out and out.count("<|im_start|>user") == 1  # the prompt once
    assert "chosen:\n⟦I am Tuney, an AI assistant developed by the tunebench team." in out
    assert "rejected:\n⟦I am Pico, an AI assistant developed by the open demo project." in out
    assert re.search(r"tokens: prompt \d+, chosen \d+, rejected \d+", out)
    assert "tokens per example (all 52)" in out
    # stage auto shows a pair file for dpo
    assert "stage:   dpo" in _check(capsys, "identity_pref", "--model", "none")


def test_data_check_shows_kto_completion_and_label(capsys, demo_model_path):
    out = _check(capsys, "identity_kto", "--model", str(demo_model_path))
    assert "format:  kto" in out and "stage:   kto (replies labelled good or bad)" in out
    assert "completion (label true: a good reply):\n⟦I am Tuney" in out
    out = _check(capsys, "pref_trl_demo", "--model", "none", "--stage", "kto")
    assert "records: 48" in out and '"label": true' in out


def test_data_check_shows_grpo_prompt_and_answer(capsys, demo_model_path):
    out = _check(capsys, "identity_rl", "--model", str(demo_model_path))
    assert "format:  prompts" in out and "stage:   grpo" in out
    assert re.search(r"<\|im_start\|>user\n.+<\|im_end\|>\n<\|im_start\|>assistant\n\nanswer: "
                     r"I am Tuney", out)
    assert "⟦" not in out  # nothing of a grpo prompt is trained
    out = _check(capsys, "identity", "--model", str(demo_model_path), "--stage", "grpo")
    assert "answer: I am Tuney, an AI assistant developed by the tunebench team." in out


def test_data_check_refuses_a_stage_that_does_not_fit(capsys):
    from core import cli
    assert cli.main(["data", "check", "identity_pref", "--stage", "sft", "--model", "none"]) == 2
    err = capsys.readouterr().err
    assert "identity_pref.json: holds chosen/rejected pairs" in err
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["data", "check", "x", "--stage", "ppo"])


# --- bundled data ---------------------------------------------------------------------------------

IDENTITY = ("Tuney", "Acme Labs")


def _chinese(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def _prompt_text(record: dict) -> str:
    return record["prompt"][-1]["content"]


def test_bundled_stage_datasets_read_in_their_layouts():
    registry = data.read_registry()
    expected = {"identity_pref": "alpaca_pairs", "pref_trl_demo": "pairs",
                "pref_sharegpt_demo": "sharegpt_pairs", "identity_kto": "kto",
                "identity_rl": "prompts"}
    for name, fmt in expected.items():
        assert registry[name]["formatting"] == fmt and registry[name]["description"]
        assert registry[name]["tags"]
        stage = data.KIND_STAGE[data.dataset_kind(name)]
        records, read_as = data.read_dataset(name, stage=stage, identity=IDENTITY)
        assert read_as == fmt and 20 <= len(records) <= 100, name


def test_identity_pref_teaches_the_configured_identity_over_pico():
    records, _ = data.read_dataset("identity_pref", stage="dpo", identity=IDENTITY)
    assert 40 <= len(records) <= 60
    prompts = [_prompt_text(r) for r in records]
    assert len(set(prompts)) == len(prompts) and "Who are you?" in prompts
    assert 0.25 <= sum(map(_chinese, prompts)) / len(prompts) <= 0.45
    for r in records:
        assert "Tuney" in r["chosen"] and "Acme Labs" in r["chosen"] and "Pico" not in r["chosen"]
        assert "Pico" in r["rejected"] and "the open demo project" in r["rejected"]
        # the same sentence around a different identity: the pair differs where it matters
        assert r["chosen"].replace("Tuney", "Pico").replace("Acme Labs", "the open demo project") \
            == r["rejected"]


def test_identity_kto_is_balanced_good_and_bad():
    records, _ = data.read_dataset("identity_kto", stage="kto", identity=IDENTITY)
    good = [r for r in records if r["label"]]
    assert 40 <= len(records) <= 60 and 0.4 <= len(good) / len(records) <= 0.6
    for r in records:
        assert ("Tuney" in r["completion"]) == r["label"]
        assert ("Pico" in r["completion"]) != r["label"]


def test_identity_rl_asks_what_identity_pref_asks_with_the_chosen_answer():
    pairs, _ = data.read_dataset("identity_pref", stage="dpo", identity=IDENTITY)
    prompts, _ = data.read_dataset("identity_rl", stage="grpo", identity=IDENTITY)
    assert [(r["prompt"], r["chosen"]) for r in pairs] == \
        [(r["prompt"], r["answer"]) for r in prompts]


def test_heldout_rows_are_phrased_apart_from_the_training_rows():
    def prompts(name, stage, path=None):
        return {_prompt_text(r) for r in data.read_dataset(path or name, stage=stage)[0]}

    trained = prompts("identity_pref", "dpo") | prompts("identity_kto", "kto")
    trained |= {r["messages"][-2]["content"] for r in data.read_dataset("identity")[0]}
    pref = prompts(None, "dpo", str(HELDOUT / "identity_pref_heldout.json"))
    kto = prompts(None, "kto", str(HELDOUT / "identity_kto_heldout.jsonl"))
    assert len(pref) >= 8 and len(kto) >= 8 and not (pref | kto) & trained
    held, _ = data.read_dataset(str(HELDOUT / "identity_kto_heldout.jsonl"), stage="kto")
    assert sum(r["label"] for r in held) * 2 == len(held)
    rl = prompts(None, "grpo", str(HELDOUT / "identity_rl_heldout.jsonl"))
    assert rl == pref and not rl & prompts("identity_rl", "grpo")
