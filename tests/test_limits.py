"""Cost limits: inputs that are small on the wire but huge once read are refused
early, with short messages (core/limits.py and the readers that use it)."""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import pytest

from core import config as cfg
from core import data, limits
from core.errors import BadInput

# --- check_text / check_path_text ------------------------------------------------------


@pytest.mark.parametrize("value, fragment", [
    ("demo\x00", "NUL (U+0000) at position 5"),
    ("a\x1bb", "escape (U+001B)"),
    ("two\nlines", "newline (U+000A)"),
    ("tab\there", "tab (U+0009)"),
    ("bad \ud800 text", "unpaired surrogate (U+D800) at position 5"),
    ("x" * 11, "is 11 characters long; the limit is 10"),
])
def test_check_text_refuses_naming_the_field(value, fragment):
    with pytest.raises(BadInput) as info:
        limits.check_text(value, "some_field", 10 if len(value) > 10 else 100)
    assert info.value.field == "some_field"
    assert "field 'some_field'" in str(info.value)
    assert fragment in str(info.value)


def test_check_text_multiline_allows_tab_newline_cr_only():
    text = "line one\r\n\tline two\n"
    assert limits.check_text(text, "f", 100, multiline=True) == text
    with pytest.raises(BadInput, match="NUL"):
        limits.check_text("a\nb\x00", "f", 100, multiline=True)
    assert limits.check_text("plain, ünïcode ✓ text", "f", 100) == "plain, ünïcode ✓ text"


def test_check_text_on_fifty_million_characters_is_fast_and_short():
    huge = "n" * 50_000_000
    start = time.perf_counter()
    with pytest.raises(BadInput) as info:
        limits.check_text(huge, "identity_name", limits.MAX_NAME_CHARS)
    assert time.perf_counter() - start < 0.5
    message = str(info.value)
    assert len(message) < 500
    assert "50,000,000 characters long; the limit is 200" in message


def test_check_path_text():
    assert limits.check_path_text("saves/run-1/checkpoint-3", "resume") == \
        "saves/run-1/checkpoint-3"
    assert limits.check_path_text("data/" + "é" * 125 + ".json", "dataset")  # 255 bytes: ok
    with pytest.raises(BadInput) as info:
        limits.check_path_text("data/" + "é" * 128, "dataset")  # 256 bytes in UTF-8
    assert "field 'dataset'" in str(info.value)
    assert "name of 256 bytes; file systems allow at most 255" in str(info.value)
    deep = "/".join(["éé"] * 1000)  # 2,999 characters, 4,999 bytes
    with pytest.raises(BadInput, match="is 4,999 bytes long in UTF-8; the limit for a path is "
                                       "4,095"):
        limits.check_path_text(deep, "output_dir")
    with pytest.raises(BadInput, match="NUL"):
        limits.check_path_text("demo\x00", "model")


# --- quote ----------------------------------------------------------------------------------


def test_quote_short_values_are_plain_repr():
    assert limits.quote("demo") == "'demo'"
    assert limits.quote(3.5) == "3.5"
    assert limits.quote(["a", 1]) == "['a', 1]"
    assert limits.quote(None) == "None"


def test_quote_cuts_long_text_and_says_how_long():
    quoted = limits.quote("x" * 10_000)
    assert quoted.endswith("… (10,000 characters)")
    assert len(quoted) < limits.MAX_QUOTE_CHARS + 30
    assert len(limits.quote("\x00" * 150)) < limits.MAX_QUOTE_CHARS + 30  # escapes count too
    assert limits.quote("abcdef", limit=3) == "'ab… (6 characters)"


def _laughs(levels: int = 10, width: int = 10):
    """The structure a YAML "billion laughs" constructs: 10**levels leaves, shared."""
    value = ["lol"] * width
    for _ in range(levels - 1):
        value = [value] * width
    return value


def test_quote_is_cheap_on_huge_and_nested_values():
    huge_dict = {f"key{i}": i for i in range(1_000_000)}
    start = time.perf_counter()
    for value in (_laughs(), huge_dict, set(range(1_000_000)), 7 ** 100_000, b"\x00" * 10**7):
        assert len(limits.quote(value)) <= limits.MAX_QUOTE_CHARS + 30
    assert time.perf_counter() - start < 0.5
    recursive = []
    recursive.append(recursive)
    assert limits.quote(recursive)


def test_describe_limits_lists_every_limit_with_its_value():
    described = dict(limits.describe_limits())
    for name in ("MAX_CONFIG_BYTES", "MAX_YAML_NODES", "MAX_PATH_BYTES", "MAX_NAME_CHARS",
                 "MAX_TABLE_ROWS", "MAX_DECODED_BYTES", "MAX_PARQUET_RATIO",
                 "MAX_UPLOAD_BYTES", "MAX_RECORD_CHARS"):
        assert isinstance(getattr(limits, name), int)
        assert described[name]
    assert described["MAX_CONFIG_BYTES"].startswith("256 KiB: ")
    assert described["MAX_TABLE_ROWS"].startswith("1,000,000: ")
    assert data.MAX_UPLOAD_BYTES == limits.MAX_UPLOAD_BYTES  # one declaration


# --- config values ------------------------------------------------------------------------


@pytest.mark.parametrize("key, value, fragment", [
    ("model", "demo\x00", "model: contains a NUL"),
    ("model", "demo\ud800", "model: contains an unpaired surrogate"),
    ("model", "m" * 300, "model: has a file or folder name of 300 bytes"),
    ("dataset_dir", "d/" * 3000, "dataset_dir: is 6,000 characters long; the limit is 4,095"),
    ("output_dir", "saves/\x07bell", "output_dir: contains a control character (U+0007)"),
    ("resume", "ckpt\x00", "resume: contains a NUL"),
    ("dataset", ["identity", "x" * 300], "dataset: has a file or folder name of 300 bytes"),
    ("dataset", "identity,bad\x00name", "dataset: contains a NUL"),
    ("dataset", ["identity"] * 65, "dataset: 65 entries; the limit is 64"),
    ("dataset", "a," * 100, "dataset: more than 64 entries"),
    ("identity_name", "N" * 201, "identity_name: is 201 characters long; the limit is 200"),
    ("identity_author", "line\nbreak", "identity_author: contains a newline"),
    ("run_name", "r" * 65, "run_name: is 65 characters long; the limit is 64"),
    ("lora_target", "q" * 1025, "lora_target: is 1,025 characters long; the limit is 1,024"),
    ("template", "t" * 300, "template: is 300 characters long; the limit is 200"),
])
def test_text_settings_are_vetted_before_anything_is_created(key, value, fragment, tmp_path,
                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadInput) as info:
        cfg.from_mapping({key: value})
    assert fragment in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no run folder, no file


def test_setting_metadata_documents_the_text_limits():
    meta = {name: f.metadata for name, f in cfg.FIELDS.items()}
    for name in ("model", "dataset", "dataset_dir", "output_dir", "resume"):
        assert meta[name]["path"] and meta[name]["max_len"] == limits.MAX_PATH_BYTES
    assert meta["identity_name"]["max_len"] == limits.MAX_NAME_CHARS
    assert meta["run_name"]["max_len"] == limits.MAX_RUN_NAME_CHARS
    assert meta["lora_target"]["max_len"] == limits.MAX_LORA_TARGET_CHARS
    assert meta["template"]["max_len"] == limits.MAX_SETTING_CHARS
    assert meta["epochs"]["max_len"] is None


def test_fifty_million_character_name_is_refused_fast_and_briefly():
    start = time.perf_counter()
    with pytest.raises(BadInput) as info:
        cfg.from_mapping({"identity_name": "N" * 50_000_000})
    assert time.perf_counter() - start < 1
    assert len(str(info.value)) < 500


def test_got_value_in_messages_is_quoted_briefly():
    for raw in ({"epochs": "x" * 1_000_000}, {"dataset": _laughs()},
                {"batch_size": {f"k{i}": i for i in range(100_000)}}):
        start = time.perf_counter()
        with pytest.raises(BadInput) as info:
            cfg.from_mapping(raw)
        assert time.perf_counter() - start < 1
        assert len(str(info.value)) < 500, str(info.value)[:1000]


def test_many_problems_are_capped():
    raw = {f"unknown_{i}": i for i in range(5000)}
    with pytest.raises(BadInput) as info:
        cfg.from_mapping(raw)
    message = str(info.value)
    assert f"and {5000 - limits.MAX_REPORTED_PROBLEMS:,} more problems" in message
    assert message.count("unknown key") == limits.MAX_REPORTED_PROBLEMS
    with pytest.raises(BadInput, match="unknown key 'k" + "k" * 40):
        cfg.from_mapping({"k" * 100_000: 1})  # long keys: quoted, no slow suggestion


def test_over_long_cli_pair_is_quoted():
    with pytest.raises(BadInput) as info:
        cfg.parse_overrides(["z" * 100_000])
    assert len(str(info.value)) < 500


# --- YAML ---------------------------------------------------------------------------------------


def _bomb_yaml(levels: int = 10, width: int = 10) -> str:
    """A "billion laughs": each level a list of `width` aliases to the level before."""
    lines = ["a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    lines.append(f"dataset: *a{levels - 1}")
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_is_refused_fast_with_a_short_message(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb_yaml(), encoding="utf-8")
    assert path.stat().st_size < 700
    start = time.perf_counter()
    with pytest.raises(BadInput) as info:
        cfg.load(path)
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert elapsed < 1, elapsed
    assert len(message) < 500
    assert "bomb.yaml" in message
    assert (f"expands to more than {limits.MAX_YAML_NODES:,} values through YAML aliases"
            in message)


def test_modest_anchors_still_load(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text("identity_name: &who Nova\n"
                    "identity_author: *who\n"
                    "dataset: &sets [identity, alpaca_demo]\n"
                    "epochs: &n 2\n"
                    "logging_steps: *n\n", encoding="utf-8")
    config = cfg.load(path)
    assert config.identity_author == "Nova" and config.dataset == ["identity", "alpaca_demo"]
    assert config.logging_steps == 2


def test_yaml_that_refers_to_itself_is_refused(tmp_path):
    path = tmp_path / "cycle.yaml"
    path.write_text("dataset: &a [identity, *a]\n", encoding="utf-8")
    with pytest.raises(BadInput, match="refers to a value that contains it"):
        cfg.load(path)


def test_many_distinct_values_are_refused(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("dataset: [" + ", ".join(["x"] * (limits.MAX_YAML_NODES + 1)) + "]\n",
                    encoding="utf-8")
    with pytest.raises(BadInput, match="config has more than 10,000 values"):
        cfg.load(path)


def test_oversized_config_file_is_refused_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "huge.yaml"
    path.write_bytes(b"# comment\n" * (limits.MAX_CONFIG_BYTES // 10 + 1))
    with pytest.raises(BadInput, match=r"huge\.yaml: config file is 262,150 bytes; the limit is "
                                       r"262,144"):
        cfg.read_yaml(path)

    def no_read(*args, **kwargs):
        raise AssertionError("the file was read")
    monkeypatch.setattr(Path, "read_text", no_read)
    monkeypatch.setattr(Path, "read_bytes", no_read)
    with pytest.raises(BadInput, match="config file is"):
        cfg.read_yaml(path)


def test_long_yaml_scalar_is_refused_fast(tmp_path):
    path = tmp_path / "sexagesimal.yaml"  # YAML 1.1 base-60 integer: 1:1:1:... costs O(n^2)
    path.write_text("epochs: " + ":".join(["1"] * 100_000) + "\n", encoding="utf-8")
    start = time.perf_counter()
    with pytest.raises(BadInput, match="the value at line 1 is 199,999 characters long; the "
                                       "limit is 10,000"):
        cfg.load(path)
    assert time.perf_counter() - start < 1


@pytest.mark.parametrize("text", [
    "model: *" + "n" * 100_000 + "\n",  # undefined alias: PyYAML quotes its whole name
    "model: !" + "t" * 100_000 + " x\n",  # unknown tag
    "epochs: [1, 2\n",
    "[" * 5000 + "]" * 5000 + "\n",  # nested too deeply for PyYAML's recursion
])
def test_yaml_errors_are_short_and_one_line(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(BadInput) as info:
        cfg.load(path)
    message = str(info.value)
    assert "bad.yaml: invalid YAML" in message
    assert len(message) < 500 and "\n" not in message


def test_huge_integer_in_yaml_is_bad_input(tmp_path):
    path = tmp_path / "digits.yaml"
    path.write_text("epochs: " + "9" * 5000 + "\n", encoding="utf-8")
    with pytest.raises(BadInput):
        cfg.load(path)
    path.write_text("epochs: " + "9" * 400 + "\n", encoding="utf-8")  # float() overflows
    with pytest.raises(BadInput, match="epochs: expected a finite number"):
        cfg.load(path)


# --- dataset tables ----------------------------------------------------------------------


def _write_parquet(path: Path, columns: dict, **kwargs) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table(columns), path, **kwargs)
    return path


def _parquet_bomb(path: Path) -> Path:
    """300,000 rows of one 1,000-character text, dictionary-encoded and compressed:
    about 33 KB on disk, 300 MB decoded."""
    import pyarrow as pa
    column = pa.array(["x" * 1000] * 300_000).dictionary_encode()
    return _write_parquet(path, {"text": column}, compression="zstd")


def _rss() -> int:
    psutil = pytest.importorskip("psutil")
    gc.collect()
    return psutil.Process().memory_info().rss


def test_parquet_bomb_upload_is_refused_fast_without_decoding(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow.compute  # noqa: F401 - imported before measuring: an import costs memory
    bomb = _parquet_bomb(tmp_path / "bomb.parquet")
    assert bomb.stat().st_size < 60_000
    folder = tmp_path / "data"
    warm = _write_parquet(tmp_path / "warm.parquet", {"instruction": ["hi"] * 3,
                                                       "output": ["hello"] * 3})
    data.register_file(warm, str(folder))  # first use of the reader's code paths
    before = _rss()
    start = time.perf_counter()
    with pytest.raises(BadInput) as info:
        data.register_file(bomb, str(folder))
    elapsed = time.perf_counter() - start
    grown = (_rss() - before) / 2**20
    message = str(info.value)
    assert elapsed < 1, elapsed
    assert grown < 30, f"RSS grew {grown:.0f} MB"
    assert "bomb.parquet" in message and "decompression bomb" in message
    assert "100 times its size" in message
    assert [p.name for p in (folder / "uploads").iterdir() if not p.name.startswith(".")] == \
        ["warm.parquet"]  # the bomb was not copied


def test_parquet_over_the_row_limit_is_refused_from_the_footer(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "MAX_TABLE_ROWS", 100)
    path = _write_parquet(tmp_path / "rows.parquet", {"text": [f"t{i}" for i in range(101)]})
    monkeypatch.setattr(data, "_row_group_runs", lambda meta: pytest.fail("decoded"))
    with pytest.raises(BadInput, match=r"rows\.parquet: has 101 records; the limit is 100 per "
                                       r"file"):
        data.read_dataset(str(path), stage="pt")


def test_parquet_decompressing_past_the_limit_is_refused_from_the_footer(tmp_path, monkeypatch):
    # plain-encoded, highly compressible text: the footer's uncompressed size tells
    texts = [f"{i:06d}" + "y" * 100_000 for i in range(200)]  # 20 MB, distinct values
    path = _write_parquet(tmp_path / "zip.parquet", {"text": texts}, use_dictionary=False,
                          compression="zstd")
    assert path.stat().st_size < 100_000
    monkeypatch.setattr(data, "_row_group_runs", lambda meta: pytest.fail("decoded"))
    with pytest.raises(BadInput, match="decompresses to more than 8.0 MB .* decompression bomb"):
        data.read_dataset(str(path), stage="pt")


def test_parquet_over_the_decoded_limit_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "MAX_DECODED_BYTES", 2**20)  # 1 MiB
    path = _write_parquet(tmp_path / "big.parquet",
                          {"text": [f"{i} " + "z" * 2000 for i in range(1000)]})
    with pytest.raises(BadInput, match="more than 1 MB of data; the limit is 1 MB per file"):
        data.read_dataset(str(path), stage="pt")


def test_ordinary_parquet_files_still_read(tmp_path):
    pytest.importorskip("pyarrow")
    rows = [{"conversations": [{"from": "human", "value": f"question {i}"},
                               {"from": "gpt", "value": "answer " * (i % 7 + 1)}],
             "system": "Be brief." if i % 2 else None} for i in range(5000)]
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=700)  # several row groups
    records, fmt = data.read_dataset(str(path))
    assert fmt == "sharegpt" and len(records) == 5000
    assert records[3]["messages"] == [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "question 3"},
                                      {"role": "assistant", "content": "answer answer answer "
                                                                       "answer "}]
    assert records[4999]["messages"][-2]["content"] == "question 4999"
    # a repeated column compresses well but far below the ratio that marks a bomb
    repeated = _write_parquet(tmp_path / "repeated.parquet", {
        "instruction": [f"question {i}" for i in range(20_000)],
        "output": [f"answer {i}" for i in range(20_000)],
        "system": ["You are a helpful assistant. " * 20] * 20_000})
    key = data.register_file(repeated, str(tmp_path / "data"))
    assert len(data.read_dataset(key, str(tmp_path / "data"))[0]) == 20_000


def test_jsonl_over_the_row_limit_stops_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "MAX_TABLE_ROWS", 5)
    path = tmp_path / "rows.jsonl"
    good = json.dumps({"instruction": "q", "output": "a"})
    path.write_text("\n".join([good] * 5 + ["", good, "{broken"]) + "\n", encoding="utf-8")
    with pytest.raises(BadInput) as info:  # not the broken line: reading stopped before it
        data.register_file(path, str(tmp_path / "data"))
    assert str(info.value) == (f"{path}: has more than 5 records; the limit is 5 per file "
                               "(split it into smaller files)")
    path.write_text("\n\n".join([good] * 5) + "\n\n\n", encoding="utf-8")  # exactly 5: fine
    assert data.register_file(path, str(tmp_path / "data")) == "rows"


def test_csv_over_the_row_limit_stops_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "MAX_TABLE_ROWS", 3)
    path = tmp_path / "rows.csv"
    path.write_text("instruction,output\n" + "q,a\n" * 4 + '"unclosed\n', encoding="utf-8")
    with pytest.raises(BadInput, match=r"rows\.csv: has more than 3 records; the limit is 3"):
        data.read_dataset(str(path))


def test_json_over_the_row_limit_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "MAX_TABLE_ROWS", 3)
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"instruction": "q", "output": "a"}] * 4), encoding="utf-8")
    with pytest.raises(BadInput, match=r"rows\.json: has 4 records; the limit is 3 per file"):
        data.read_dataset(str(path))


def test_text_file_over_the_decoded_limit_is_refused_before_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "MAX_DECODED_BYTES", 2**20)
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps({"text": "w" * 2**20}) + "\n", encoding="utf-8")
    read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read") if self == path
                        else read_bytes(self))
    with pytest.raises(BadInput, match=r"big\.jsonl: file is 1 MB; the limit is 1 MB per file"):
        data.read_dataset(str(path), stage="pt")


def test_jsonl_line_numbers_survive_blank_lines(tmp_path):
    path = tmp_path / "gaps.jsonl"
    good = json.dumps({"instruction": "q", "output": "a"})
    path.write_text(f"\n{good}\r\n  \n\n{good}\n\t\n{{broken\n", encoding="utf-8")
    with pytest.raises(BadInput, match=r"record 3: invalid JSON on line 7 column 2"):
        data.read_dataset(str(path))
    path.write_text(f"{good}\n\n{good}", encoding="utf-8")  # no final newline
    assert len(data.read_dataset(str(path))[0]) == 2


def test_ordinary_text_files_still_register(tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(2000)]
    jsonl = tmp_path / "ok.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    csv_path = tmp_path / "ok.csv"
    csv_path.write_text("instruction,output\n" + "".join(f"q{i},a{i}\n" for i in range(2000)),
                        encoding="utf-8")
    folder = str(tmp_path / "data")
    assert data.register_file(jsonl, folder) == "ok"
    assert data.register_file(csv_path, folder) == "ok-2"
    for name in ("ok", "ok-2"):
        records, _ = data.read_dataset(name, folder)
        assert len(records) == 2000 and records[-1]["messages"][1]["content"] == "a1999"


def test_the_readme_states_every_limit_with_its_value():
    """The Security section's table is the documentation of the limits: keep it true."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    for name, description in limits.describe_limits():
        value, what = description.split(": ", 1)
        assert f"| `{name}` | {value} | {what} |" in readme, name
