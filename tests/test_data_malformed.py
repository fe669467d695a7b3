"""Malformed datasets: every one is a BadInput that says where and what, never a crash.

tests/malformed/ holds one file (or registry folder) per case; cases.json says what
the message must contain. The hypothesis tests feed the readers arbitrary JSON
values and bytes: they either read into well-formed records or raise BadInput.
"""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import data
from core.errors import BadInput

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).parent / "malformed"
CASES = json.loads((HERE / "cases.json").read_text(encoding="utf-8"))
REPO = Path(__file__).resolve().parent.parent


def _read_case(case_id: str, case: dict):
    if "eval_task" in case:  # read as `tunebench eval` checks it, before any job folder
        from core import config as cfg
        from core.eval_tasks import TASKS
        config = cfg.eval_config({"eval_task": case["eval_task"], "dataset": [str(HERE / case_id)]})
        return TASKS[config.eval_task].check(config)
    if "dataset_dir" in case:
        return data.read_dataset(case["dataset"], dataset_dir=str(HERE / case["dataset_dir"]))
    return data.read_dataset(str(HERE / case_id), stage=case.get("stage", "sft"))


def test_corpus_is_big_enough():
    assert len(CASES) >= 40
    files = [c for c in CASES if "dataset_dir" not in c]
    # every listed file exists, except the one case about a missing file
    assert [c for c in files if not (HERE / c).exists()] == ["does_not_exist.json"]


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_malformed_input_is_bad_input_naming_where(case_id):
    case = CASES[case_id]
    with pytest.raises(BadInput) as info:
        _read_case(case_id, case)
    message = str(info.value)
    assert case.get("file", Path(case_id).name) in message
    if case["record"] is not None:
        assert f"record {case['record']}" in message
        assert info.value.record == case["record"]
    if case["field"] is not None:
        assert f"field '{case['field']}'" in message
    for fragment in case["expect"]:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "\n" not in message  # one line, as the CLI prints it


def test_huge_record_is_refused(tmp_path):
    path = tmp_path / "huge.jsonl"
    small = {"instruction": "a", "output": "b"}
    big = {"instruction": "a", "output": "x" * (data.MAX_RECORD_CHARS + 1)}
    path.write_text(json.dumps(small) + "\n" + json.dumps(big) + "\n", encoding="utf-8")
    with pytest.raises(BadInput, match=r"huge\.jsonl, record 2: holds 10,000,00\d characters"):
        data.read_dataset(str(path))


def test_large_but_allowed_record_reads(tmp_path):
    path = tmp_path / "long.csv"
    long_text = "word " * 100_000  # over the csv module's default 128 KiB field limit
    path.write_text(f"instruction,output\nrepeat,{long_text}\n", encoding="utf-8")
    records, _ = data.read_dataset(str(path))
    assert records[0]["messages"][1]["content"] == long_text


def test_upload_size_limit(tmp_path, monkeypatch):
    path = tmp_path / "big.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}] * 50), encoding="utf-8")
    monkeypatch.setattr(data, "MAX_UPLOAD_BYTES", 100)
    with pytest.raises(BadInput, match=r"big\.json: file is .* uploads are limited to"):
        data.register_file(path, dataset_dir=str(tmp_path / "d"))
    assert not (tmp_path / "d" / "dataset_info.json").exists()


def test_unknown_stage_is_bad_input():
    with pytest.raises(BadInput, match="unknown stage 'ppo'"):
        data.read_dataset("identity", stage="ppo")


# --- the real CLI: exit code 2, one line, no traceback -----------------------------------

CLI_CASES = ["broken_json.json", "sharegpt_two_users.jsonl", "csv_missing_column.csv",
             "not_parquet.parquet", "not_utf8.json", "registry_unknown_name", "unsupported.txt"]


@pytest.mark.parametrize("case_id", CLI_CASES)
def test_cli_data_check_exits_2_without_traceback(case_id):
    case = CASES[case_id]
    if "dataset_dir" in case:
        args = [case["dataset"], "--dataset-dir", str(HERE / case["dataset_dir"])]
    else:
        args = [str(HERE / case_id)]
    proc = subprocess.run([sys.executable, "-m", "webui.cli", "data", "check", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert case["expect"][0] in lines[0]


# --- every case, in the CLI and in the page --------------------------------------------

def _cli_args(case_id: str, case: dict) -> list[str]:
    if "dataset_dir" in case:
        return [case["dataset"], "--dataset-dir", str(HERE / case["dataset_dir"])]
    return [str(HERE / case_id)]


def _expected(case_id: str, case: dict) -> list[str]:
    """What a person must read: the file, the record, the field and the problem."""
    wanted = [case.get("file", Path(case_id).name), *case["expect"]]
    if case["record"] is not None:
        wanted.append(f"record {case['record']}")
    if case["field"] is not None:
        wanted.append(f"field '{case['field']}'")
    return wanted


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_every_case_in_the_cli_exits_2_with_one_line(case_id, capsys):
    """`tunebench data check` for the stage training uses, in-process (the cases above run
    it as a real command)."""
    from webui import cli
    case = CASES[case_id]
    if "eval_task" in case:  # a file for `tunebench eval`: checked as the job checks it
        code = cli.main(["eval", f"eval_task={case['eval_task']}", f"dataset={HERE / case_id}"])
    else:
        code = cli.main(["data", "check", *_cli_args(case_id, case), "--model", "none",
                         "--stage", case.get("stage", "sft")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err
    for fragment in _expected(case_id, CASES[case_id]):
        assert fragment in err


@pytest.fixture(scope="module")
def train_page(tmp_path_factory):
    """The Train tab's handlers, as the page calls them, over a scratch saves folder."""
    import gradio as gr

    from webui import train_tab
    saves = tmp_path_factory.mktemp("saves")
    with gr.Blocks():
        tab = train_tab.TrainTab(saves)
    return tab, saves


def page_text(markup: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", markup))


# Cases that are bad for any job; the eval-only ones are fine to train on (RL prompts
# without an answer train with grpo) and are refused by the eval job alone.
TRAIN_CASES = sorted(c for c in CASES if not CASES[c].get("eval_only"))


@pytest.mark.parametrize("case_id", TRAIN_CASES)
def test_every_case_in_the_page_is_explained_and_nothing_starts(case_id, train_page,
                                                                monkeypatch):
    """Start with the case as the dataset: the status box says what is wrong; no run."""
    from core import config as cfg
    from core import paths
    from webui import form, train_tab
    monkeypatch.setenv(paths.ENV_ROOTS, str(HERE))  # the page may read the corpus folder
    tab, saves = train_page
    case = CASES[case_id]
    if "dataset_dir" in case:
        config = cfg.TrainConfig(dataset=[case["dataset"]],
                                 dataset_dir=str(HERE / case["dataset_dir"]))
    else:
        config = cfg.TrainConfig(dataset=[str(HERE / case_id)], stage=case.get("stage", "sft"))
    shown = tab.on_start(train_tab.Session(), *form.values_of(config, tab.form.names))[0]
    text = page_text(shown)
    assert "not started" in text and "Traceback" not in text
    for fragment in _expected(case_id, case):
        assert fragment in text
    assert list(saves.iterdir()) == []


# Files that are wrong whatever the stage (plain text is fine to upload: it trains with pt).
UPLOADABLE = sorted(c for c in TRAIN_CASES
                    if "dataset_dir" not in CASES[c] and "stage" not in CASES[c]
                    and (HERE / c).is_file() and c != "text_for_sft.jsonl")


@pytest.mark.parametrize("case_id", UPLOADABLE)
def test_every_file_case_uploaded_in_the_page_is_refused(case_id, train_page, tmp_path,
                                                         monkeypatch):
    tab, _ = train_page
    monkeypatch.chdir(tmp_path)  # the page may write only inside its project's data/
    _, message = tab.on_upload(str(HERE / case_id), "", str(tmp_path / "data"), [])
    assert message.startswith("**Not registered.**")
    for fragment in _expected(case_id, CASES[case_id]):
        assert fragment in message
    assert not (tmp_path / "data" / "dataset_info.json").exists()


# --- property tests ------------------------------------------------------------------------

def assert_well_formed(records: list, stage: str) -> None:
    assert isinstance(records, list) and records
    for record in records:
        if stage == "pt":
            assert list(record) == ["text"] and isinstance(record["text"], str)
        elif stage == "sft":
            assert list(record) == ["messages"]
            assert_turns(record["messages"], last="assistant")
        else:
            assert_turns(record["prompt"], last="user")
            assert_stage_record(record, stage)


def assert_turns(messages: list, last: str) -> None:
    """An optional system message, then user/assistant alternating, ending with `last`."""
    if messages[0]["role"] == "system":
        messages = messages[1:]
    assert messages and messages[-1]["role"] == last
    for i, message in enumerate(messages):
        assert set(message) == {"role", "content"}
        assert message["role"] == ("user" if i % 2 == 0 else "assistant")
        assert isinstance(message["content"], str) and message["content"].strip()


def assert_stage_record(record: dict, stage: str) -> None:
    """The record contract of the prompt-and-reply stages (core/stage_data.py)."""
    if stage in ("rm", "dpo"):
        assert list(record) == ["prompt", "chosen", "rejected"]
        assert record["chosen"].strip() and record["rejected"].strip()
        assert record["chosen"].strip() != record["rejected"].strip()
    elif stage == "kto":
        assert list(record) == ["prompt", "completion", "label"]
        assert record["completion"].strip() and isinstance(record["label"], bool)
    else:
        assert stage == "grpo" and list(record) == ["prompt", "answer"]
        assert record["answer"] is None or record["answer"].strip()


def read_or_bad_input(path: Path, stage: str = "sft") -> None:
    """The property: read into well-formed records, or raise BadInput. Nothing else."""
    try:
        records, fmt = data.read_dataset(str(path), stage=stage, identity=("N", "A"))
    except BadInput as err:
        assert str(err) and path.name in str(err)
        return
    assert fmt in data.FORMATS
    assert_well_formed(records, stage)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)
# values shaped like the real formats, so the readers get past the first checks
KEYS = ["instruction", "input", "output", "system", "history", "conversations", "messages",
        "text", "from", "value", "role", "content", "id", "prompt", "response", "context",
        "chosen", "rejected", "label", "completion", "answer"]
ROLE_NAMES = ["human", "gpt", "user", "assistant", "system", "observation", "narrator"]
shaped_values = st.recursive(
    st.none() | st.booleans() | st.integers(0, 3)
    | st.sampled_from(["", " ", "hi", "{{name}}", "true"] + ROLE_NAMES),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS), inner,
                                                                 max_size=4),
    max_leaves=16)
FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def _write(folder: str, name: str, content: str | bytes) -> Path:
    path = Path(folder) / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


@FAST
@given(value=json_values | st.lists(shaped_values, max_size=4), stage=st.sampled_from(data.STAGES))
def test_any_json_document_reads_or_is_bad_input(value, stage):
    with tempfile.TemporaryDirectory() as tmp:
        read_or_bad_input(_write(tmp, "any.json", json.dumps(value)), stage)


@FAST
@given(rows=st.lists(shaped_values | json_values, max_size=5), stage=st.sampled_from(data.STAGES))
def test_any_jsonl_lines_read_or_are_bad_input(rows, stage):
    content = "".join(json.dumps(row) + "\n" for row in rows)
    with tempfile.TemporaryDirectory() as tmp:
        read_or_bad_input(_write(tmp, "any.jsonl", content), stage)


@FAST
@given(header=st.lists(st.sampled_from(KEYS) | st.text(max_size=5), max_size=4),
       cells=st.lists(st.lists(st.text(max_size=12) | st.sampled_from(["true", "FALSE"]),
                               max_size=5), max_size=4),
       stage=st.sampled_from(data.STAGES))
def test_any_csv_reads_or_is_bad_input(header, cells, stage):
    import csv
    import io
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(cells)
    with tempfile.TemporaryDirectory() as tmp:
        read_or_bad_input(_write(tmp, "any.csv", buffer.getvalue()), stage)


@FAST
@given(blob=st.binary(max_size=200), ext=st.sampled_from(data.EXTENSIONS))
def test_any_bytes_read_or_are_bad_input(blob, ext):
    with tempfile.TemporaryDirectory() as tmp:
        read_or_bad_input(_write(tmp, "blob" + ext, blob))


@FAST
@given(rows=st.lists(st.fixed_dictionaries(
    {}, optional={k: shaped_values for k in ("instruction", "output", "conversations",
                                             "messages", "text", "prompt", "chosen",
                                             "rejected", "label", "answer")}),
    min_size=1, max_size=4), stage=st.sampled_from(data.STAGES))
def test_any_parquet_table_reads_or_is_bad_input(rows, stage):
    import pyarrow as pa
    import pyarrow.parquet as pq
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "any.parquet"
        try:
            pq.write_table(pa.Table.from_pylist(rows), path)
        except (pa.ArrowException, TypeError, ValueError):
            return  # pyarrow cannot store these mixed types; nothing to read
        read_or_bad_input(path, stage)


@FAST
@given(name=st.text(max_size=300), folder=st.sampled_from(["data", "no/such/dir", "\x00"]))
def test_any_dataset_name_reads_or_is_bad_input(name, folder):
    try:
        records, _ = data.read_dataset(name, dataset_dir=folder)
    except BadInput as err:
        assert str(err)
        return
    assert_well_formed(records, "sft")
