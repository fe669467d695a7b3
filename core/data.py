"""Datasets -> normalized records.

A dataset is a registered name (an entry of `<dataset_dir>/dataset_info.json`) or a
plain file path. Files are .json (a list of objects), .jsonl, .csv or .parquet, in
one of these formats, named by the registry or detected from the records' keys:

    alpaca          instruction, input, output (+ optional system, history [[q, a], ...])
    sharegpt        conversations: [{"from": "human"|"gpt"|"system"|..., "value": ...}]
    openai          messages: [{"role": "system"|"user"|"assistant", "content": ...}]
    text            text (plain-text pre-training)
    pairs           prompt, chosen, rejected (TRL's layout; texts or messages)
    alpaca_pairs    instruction, input (+ system, history), chosen, rejected
    sharegpt_pairs  conversations ending with the human, chosen/rejected {"from": "gpt", ...}
    kto             a conversation (messages) or prompt + completion, with a boolean label
    prompts         prompt, optional answer (RL prompts)
    choice          question, A, B, C, D, answer (multiple choice, MMLU / C-Eval layout)

Other layouts (dolly's instruction/context/response, prompt/completion) map onto
these through the registry's "columns" or are recognised automatically.

Every record becomes {"messages": [...]} (stage sft: an optional leading system
message, then user/assistant turns alternating, ending with the assistant) or
{"text": ...} (stage pt); the preference, KTO and RL formats become prompt-and-reply
records (built in core/stage_data.py). STAGE_KINDS says which kinds of data each
stage trains on. A multiple-choice file (kind "choice") is for evaluation only: no
stage trains on it; `read_choice` reads it as {"question": ..., "choices": [four
texts], "answer": "A".."D"} (core/harness.py scores it). Anything malformed raises
`BadInput` naming the file, the record (1-based), the field and what was expected.
"""

from __future__ import annotations

import collections
import csv
import difflib
import io
import json
import os
import re
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import limits, locks, paths
from .config import STAGES
from .errors import BadInput
from .i18n import Msg, msg, t

REGISTRY = "dataset_info.json"
EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet")
CHAT_FORMATS = ("alpaca", "sharegpt", "openai")
FORMATS = CHAT_FORMATS + ("text", "pairs", "alpaca_pairs", "sharegpt_pairs", "kto", "prompts",
                          "choice")
# What kind of data each format holds, and the kinds each stage trains on (a pair
# is also two KTO rows; a chat's last reply is also a GRPO prompt's answer). The
# kinds in EVAL_KINDS are for evaluation: no stage trains on them, so the Train
# tab and `datasets_for_stage` never offer them.
FORMAT_KIND = {"alpaca": "chat", "sharegpt": "chat", "openai": "chat", "text": "text",
               "pairs": "pairs", "alpaca_pairs": "pairs", "sharegpt_pairs": "pairs",
               "kto": "kto", "prompts": "prompts", "choice": "choice"}
EVAL_KINDS = ("choice",)
STAGE_KINDS = {"sft": ("chat",), "pt": ("text", "chat"), "rm": ("pairs",), "dpo": ("pairs",),
               "kto": ("kto", "pairs"), "grpo": ("prompts", "chat")}
# The stage a kind of data is shown for when none is named (`data check`).
KIND_STAGE = {"chat": "sft", "text": "pt", "pairs": "dpo", "kto": "kto", "prompts": "grpo"}
MAX_UPLOAD_BYTES = limits.MAX_UPLOAD_BYTES  # register_file refuses bigger files
MAX_RECORD_CHARS = limits.MAX_RECORD_CHARS  # one record's text; bigger is almost surely broken
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "data"

# The fields each format reads, under their canonical names. A registry "columns"
# mapping says which file column holds each one (LLaMA-Factory's names are aliases).
FIELDS = {
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "sharegpt": ("conversations", "system"),
    "openai": ("messages", "system"),
    "text": ("text",),
    "pairs": ("prompt", "chosen", "rejected", "system"),
    "alpaca_pairs": ("instruction", "input", "chosen", "rejected", "system", "history"),
    "sharegpt_pairs": ("conversations", "chosen", "rejected", "system"),
    "kto": ("messages", "conversations", "prompt", "completion", "label", "system"),
    "prompts": ("prompt", "answer", "system"),
    "choice": ("question", "A", "B", "C", "D", "answer"),
}
# The options of a multiple-choice question, by the letter that names each one.
CHOICE_LETTERS = ("A", "B", "C", "D")
REQUIRED = {"alpaca": ("instruction", "output"), "sharegpt": ("conversations",),
            "openai": ("messages",), "text": ("text",), "pairs": ("chosen", "rejected"),
            "alpaca_pairs": ("instruction", "chosen", "rejected"),
            "sharegpt_pairs": ("conversations", "chosen", "rejected"), "kto": ("label",),
            "prompts": ("prompt",), "choice": FIELDS["choice"]}
# LLaMA-Factory's names for the alpaca fields. "prompt" means the instruction only in
# the alpaca layouts; in pairs, kto and prompts it is a field of its own.
ALIASES = {"prompt": "instruction", "query": "input", "response": "output"}
ALIASED_FORMATS = (None, "alpaca", "alpaca_pairs")
STAGE_ONLY_FIELDS = {"chosen", "rejected", "label", "completion", "answer"}
FORMAT_ALIASES = {"sharegpt": {"messages": "conversations"},
                  "openai": {"conversations": "messages"},
                  "sharegpt_pairs": {"messages": "conversations"}}

# Speaker names in conversations -> normalized roles. A tool call is something the
# assistant writes; a tool's result is fed back like a user turn, so the turns
# still alternate and the model learns the reply that follows it.
ROLES = {
    "system": "system", "developer": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant",
    "function_call": "assistant",
    "observation": "user", "function": "user", "tool": "user",
}
_PLACEHOLDER = re.compile(r"\{\{\s*(name|author)\s*\}\}")


# --- registry -------------------------------------------------------------------

def _exists(path: Path, kind: str = "any") -> bool:
    """Path.exists() that treats unusable names (too long, NUL bytes) as absent."""
    try:
        return path.is_file() if kind == "file" else path.exists()
    except (OSError, ValueError):
        return False


def data_dir(dataset_dir: str | os.PathLike = "data", confine: bool | None = None) -> Path:
    """The folder to read: `dataset_dir`, or the bundled one when the default
    "data" is not present in the working directory (tunebench started elsewhere).
    Confined, the folder passes the gate (core/paths.py)."""
    path = Path(dataset_dir)
    if str(dataset_dir) == "data" and not _exists(path / REGISTRY, "file") \
            and _exists(BUNDLED_DIR / REGISTRY, "file"):
        path = BUNDLED_DIR
    if paths.confined() if confine is None else confine:
        return paths.confine(path, "dataset_dir", roots=paths.allowed_roots() + [BUNDLED_DIR])
    return path


def read_registry(dataset_dir: str | os.PathLike = "data") -> dict[str, dict]:
    """The parsed dataset_info.json ({} when the folder has none)."""
    path = data_dir(dataset_dir) / REGISTRY
    if not _exists(path, "file"):
        return {}
    raw = _parse_json(_decode(_read_bytes(path), str(path)), str(path))
    if not isinstance(raw, dict):
        raise BadInput(msg("data.registry_not_object", kind=_kind(raw)), file=str(path))
    return raw


def list_datasets(dataset_dir: str | os.PathLike = "data") -> list[str]:
    """Registered dataset names, in registry order."""
    return list(read_registry(dataset_dir))


@dataclass
class Entry:
    """Where a dataset lives and how to read it."""
    path: Path
    formatting: str | None = None
    columns: dict[str, str] = field(default_factory=dict)  # canonical field -> file column
    name: str | None = None  # registered name, None for a plain path


def resolve(name_or_path: str, dataset_dir: str | os.PathLike = "data",
            confine: bool | None = None) -> Entry:
    """A registered name or a file path -> the file and its registry settings.

    Confined (inside the page server and the jobs it starts, or `confine=True`), the
    folder, a registered entry's file and a plain path all pass the gate in
    core/paths.py, and a path outside the allowed folders is refused before anyone
    learns whether it exists.
    """
    confine = paths.confined() if confine is None else confine
    name = str(name_or_path).strip()
    if not name:
        raise BadInput(msg("data.empty_name"), field="dataset")
    limits.check_path_text(name, "dataset")
    folder = data_dir(dataset_dir, confine)
    registry = read_registry(folder)
    if name in registry:
        return _registry_entry(name, registry[name], folder, confine)
    path = paths.expand_user(name)
    looks_like_path = path.suffix.lower() in EXTENSIONS or "/" in name or os.sep in name
    refusal = None
    for raw in [name] + ([] if path.is_absolute() else [folder / path]):
        candidate = paths.expand_user(str(raw))
        if confine:
            try:  # the gate quotes what was typed, and expands it itself
                candidate = paths.confine(raw, "dataset")
            except BadInput as err:
                refusal = refusal or err
                continue
        if _exists(candidate):
            _check_file(candidate)
            return Entry(candidate)
        refusal = None  # an allowed place was looked at: "not found" is the honest answer
    if refusal is not None:
        raise refusal
    if looks_like_path:
        raise BadInput(msg("data.not_found_looked", folder=str(folder)), file=name)
    raise BadInput(_unknown_name(name, registry, folder), field="dataset")


def _unknown_name(name: str, registry: dict, folder: Path) -> Msg:
    close = difflib.get_close_matches(name, list(registry), n=1)
    hint = msg("data.did_you_mean", name=close[0]) if close else ""
    known = ", ".join(registry) if registry else msg("data.none")
    return msg("data.unknown_dataset", name=name, hint=hint, registry=str(folder / REGISTRY),
               known=known, exts=_ext_list())


def _registry_entry(name: str, raw: Any, folder: Path, confine: bool = False) -> Entry:
    reg = str(folder / REGISTRY)
    if not isinstance(raw, dict):
        raise BadInput(msg("data.entry_not_object", name=name, kind=_kind(raw)),
                       file=reg, field=name)
    file_name = raw.get("file_name")
    if not isinstance(file_name, str) or not file_name.strip():
        raise BadInput(msg("data.entry_needs_file", name=name, folder=str(folder)),
                       file=reg, field=f"{name}.file_name")
    fmt = raw.get("formatting")
    if fmt is not None and fmt not in FORMATS:
        raise BadInput(msg("data.unknown_formatting", name=name, fmt=repr(fmt),
                           formats=", ".join(FORMATS)), file=reg, field=f"{name}.formatting")
    columns = _registry_columns(name, raw.get("columns"), fmt, reg)
    path = paths.expand_user(file_name)
    path = path if path.is_absolute() else folder / path
    if confine:  # the registered file, symlinks resolved, must lie inside the roots too
        path = paths.confine(path, f"dataset '{name}'")
    if not _exists(path):
        raise BadInput(msg("data.entry_file_missing", name=name), file=str(path))
    _check_file(path)
    return Entry(path, fmt, columns, name)


def _registry_columns(name: str, raw: Any, fmt: str | None, reg: str) -> dict[str, str]:
    if raw is None:
        return {}
    where = f"{name}.columns"
    if not isinstance(raw, dict) or not all(isinstance(v, str) and v for v in raw.values()):
        raise BadInput(msg("data.columns_not_object"), file=reg, field=where)
    allowed = set(FIELDS[fmt]) if fmt else {f for fs in FIELDS.values() for f in fs}
    # Unnamed formatting: a mapping that names a stage field (chosen, label, ...) is for
    # a stage layout, where "prompt" is the prompt rather than alpaca's instruction.
    aliased = fmt in ALIASED_FORMATS and not (fmt is None and STAGE_ONLY_FIELDS & set(raw))
    columns = {}
    for key, column in raw.items():
        canon = _canonical(key, fmt, aliased)
        if canon not in allowed:
            aliases = {k for k, v in ALIASES.items() if v in allowed} if aliased else set()
            raise BadInput(msg("data.unknown_field", key=key,
                               fields=", ".join(sorted(allowed | aliases))), file=reg, field=where)
        columns[canon] = column
    return columns


def _canonical(key: str, fmt: str | None, aliased: bool = True) -> str:
    key = ALIASES.get(key, key) if aliased else key
    return FORMAT_ALIASES.get(fmt or "", {}).get(key, key)


def _check_file(path: Path) -> None:
    if path.is_dir():
        raise BadInput(msg("data.is_folder", exts=_ext_list()), file=str(path))
    if path.suffix.lower() not in EXTENSIONS:
        raise BadInput(msg("data.unsupported_type", suffix=path.suffix or msg("data.no_suffix"),
                           exts=_ext_list()), file=str(path))


def _ext_list() -> Msg:
    return msg("data.ext_list", first=", ".join(EXTENSIONS[:-1]), last=EXTENSIONS[-1])


# --- raw readers: file -> list of rows ---------------------------------------------

@dataclass
class _Source:
    """One file being read: how to find each field and how to word errors."""
    label: str
    fmt: str | None = None
    cols: dict[str, str] = field(default_factory=dict)
    mapped: dict[str, str] = field(default_factory=dict)  # what the registry asked for
    detected: bool = False
    csv: bool = False  # cells are text: "" is absent, lists arrive JSON-encoded
    table: list[str] | None = None  # column names of csv/parquet files
    lines: list[int] | None = None  # jsonl: line number of each record

    def col(self, canon: str) -> str:
        return self.cols.get(canon, canon)

    def bad(self, what: Msg, record: int | None = None, fld: str | None = None) -> BadInput:
        if record is not None and self.lines and record <= len(self.lines) \
                and self.lines[record - 1] != record:
            what = msg("data.at_line", what=what, line=self.lines[record - 1])
        return BadInput(what, file=self.label, record=record, field=fld)


def _read_bytes(path: Path) -> bytes:
    """The whole file, refusing one over MAX_DECODED_BYTES before reading it (for a
    text file the bytes are the decoded data)."""
    try:
        size = path.stat().st_size
        if size > limits.MAX_DECODED_BYTES:
            raise BadInput(msg("data.file_too_big", size=f"{size / 2**20:,.0f}",
                               limit=f"{limits.MAX_DECODED_BYTES / 2**20:,.0f}"), file=str(path))
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadInput(msg("data.file_not_found"), file=str(path)) from None
    except OSError as err:
        raise BadInput(msg("data.cannot_read", error=str(err.strerror or err)),
                       file=str(path)) from None
    if not data.strip():
        raise BadInput(msg("data.file_empty"), file=str(path))
    return data


def _decode(data: bytes, label: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise BadInput(msg("data.not_utf8_at", byte=f"{data[err.start]:02x}", line=line),
                       file=label) from None


def _parse_json(text: str, label: str, what: str = "JSON") -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        hint = msg("data.hint_jsonl") if err.msg == "Extra data" else ""
        raise BadInput(msg("data.invalid_json_at", what=what, line=err.lineno, col=err.colno,
                           error=err.msg, hint=hint), file=label) from None
    except RecursionError:
        raise BadInput(msg("data.invalid_json_deep", what=what), file=label) from None
    except ValueError:  # Python refuses integers of more than 4300 digits
        raise BadInput(msg("data.invalid_json_number", what=what), file=label) from None


def _read_rows(path: Path, src: _Source) -> list:
    ext = path.suffix.lower()
    if ext == ".parquet":
        return _read_parquet(path, src)
    text = _decode(_read_bytes(path), src.label)
    if ext == ".json":
        rows = _parse_json(text, src.label)
        if not isinstance(rows, list):
            raise src.bad(msg("data.expected_list_got", kind=_kind(rows),
                              hint=_nested_list_hint(rows)))
        # one document: parsed whole (its size is bounded by _read_bytes), counted after
        if len(rows) > limits.MAX_TABLE_ROWS:
            raise _too_many_rows(src, len(rows))
        return rows
    if ext == ".jsonl":
        return _read_jsonl(text, src)
    return _read_csv(text, src)


def _nested_list_hint(value: Any) -> "Msg | str":
    if isinstance(value, dict):
        key = next((k for k, v in value.items() if isinstance(v, list)), None)
        if key is not None:
            return msg("data.hint_nested_list", key=key)
    return ""


def _too_many_rows(src: _Source, count: int | None = None) -> BadInput:
    most = limits.MAX_TABLE_ROWS
    has = f"{count:,}" if count is not None else msg("data.more_than", n=f"{most:,}")
    return src.bad(msg("data.too_many_rows", count=has, most=f"{most:,}"))


_NONBLANK = re.compile(r"\S")  # \s is exactly what str.strip() removes


def _nonblank_lines(text: str):
    """(line number, line) for each line with something besides whitespace.

    Lines end at "\n" only: JSON strings may hold raw U+2028, which splitlines()
    breaks on. Lazy, unlike text.split("\n"), so a reader can stop early and a file
    of blank lines costs no list; runs of blank lines are skipped by one regex search.
    """
    pos, lineno = 0, 1
    while True:
        found = _NONBLANK.search(text, pos)
        if found is None:
            return
        newline = text.rfind("\n", pos, found.start())
        start = pos if newline < 0 else newline + 1
        lineno += text.count("\n", pos, start)
        end = text.find("\n", found.start())
        end = len(text) if end < 0 else end
        yield lineno, text[start:end]
        pos, lineno = end + 1, lineno + 1


def _read_jsonl(text: str, src: _Source) -> list:
    rows, src.lines = [], []
    for lineno, line in _nonblank_lines(text):
        if len(rows) >= limits.MAX_TABLE_ROWS:  # stop here: the rest is never parsed
            raise _too_many_rows(src)
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise src.bad(msg("data.jsonl_invalid_at", line=lineno, col=err.colno,
                              error=err.msg), len(rows) + 1) from None
        except RecursionError:
            raise src.bad(msg("data.jsonl_invalid_deep", line=lineno), len(rows) + 1) from None
        except ValueError:
            raise src.bad(msg("data.jsonl_invalid_number", line=lineno), len(rows) + 1) from None
        src.lines.append(lineno)
    return rows


def _read_csv(text: str, src: _Source) -> list[dict]:
    src.csv = True
    csv.field_size_limit(MAX_RECORD_CHARS + 1)  # the default (128 KiB) is below our own limit
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if not header or not any(h.strip() for h in header):
            raise src.bad(msg("data.csv_no_header"))
        header = [h.strip() for h in header]
        counts = collections.Counter(header)  # not header.count(): quadratic in the columns
        dupes = sorted(h for h, n in counts.items() if n > 1)
        if dupes or "" in header:
            repeated = msg("data.csv_repeated", names=", ".join(dupes)) if dupes else ""
            raise src.bad(msg("data.csv_bad_header", repeated=repeated))
        rows = []
        for values in reader:
            if not values:
                continue  # blank line
            if len(rows) >= limits.MAX_TABLE_ROWS:  # stop here: the rest is never parsed
                raise _too_many_rows(src)
            if len(values) != len(header):
                raise src.bad(msg("data.csv_row_width", values=len(values),
                                  columns=len(header), line=reader.line_num), len(rows) + 1)
            rows.append(dict(zip(header, values)))
    except csv.Error as err:
        raise src.bad(msg("data.csv_invalid", line=reader.line_num, error=str(err))) from None
    src.table = header
    return rows


# Rows read at a time (whole row groups, so at least one row group). Strings stay
# dictionary-encoded until measured, so a read costs its share of the file however
# often a value repeats.
_PARQUET_BATCH_ROWS = 65536


def _read_parquet(path: Path, src: _Source) -> list[dict]:
    """A Parquet file -> rows, refusing one that decodes to far more than its size.

    Parquet stores a repeated value once (dictionary encoding) and compresses the
    rest, so 35 KB can decode to hundreds of MB. The footer gives the row count and
    the size after decompression, checked before anything is decoded; the size after
    dictionary decoding is not in it, so the rows are then read a few row groups at a
    time with strings left dictionary-encoded, and each read's decoded size is
    measured (`_array_bytes`) before it is decoded into Python objects.

    Row groups rather than iter_batches: a batch carries every dictionary value seen
    so far in its row group, so on a column of distinct values small batches cost
    time and memory quadratic in the row group's size.
    """
    import pyarrow as pa  # lazy: pyarrow takes a while to import
    import pyarrow.parquet as pq
    try:
        size = path.stat().st_size
    except OSError as err:
        raise src.bad(msg("data.cannot_read", error=str(err.strerror or err))) from None
    if size == 0:
        raise src.bad(msg("data.file_empty"))
    budget = _parquet_budget(size)
    try:
        with pq.ParquetFile(path) as footer:
            meta = footer.metadata
        _check_parquet_footer(meta, size, budget, src)
        strings = [column.path for column in meta.schema
                   if column.physical_type == "BYTE_ARRAY"]
        rows, decoded = [], 0
        with pq.ParquetFile(path, metadata=meta, read_dictionary=strings) as reader:
            for table in _parquet_tables(reader, meta):
                decoded += sum(_array_bytes(chunk) for column in table.columns
                               for chunk in column.chunks)
                if decoded > budget:
                    raise _too_big(src, size, budget, msg("data.verb_decodes"))
                rows += _decoded(table).to_pylist()
            columns = list(reader.schema_arrow.names)
    except (pa.ArrowException, OSError, ValueError, TypeError) as err:
        raise src.bad(msg("data.not_parquet", error=str(err))) from None
    src.table = columns
    return rows


def _parquet_budget(file_size: int) -> int:
    """Most decoded bytes a Parquet file of `file_size` bytes may hold: MAX_PARQUET_RATIO
    times its size (at least PARQUET_RATIO_FLOOR_BYTES), at most MAX_DECODED_BYTES."""
    return min(limits.MAX_DECODED_BYTES,
               max(limits.PARQUET_RATIO_FLOOR_BYTES, limits.MAX_PARQUET_RATIO * file_size))


def _too_big(src: _Source, file_size: int, budget: int, verb: Msg) -> BadInput:
    if budget >= limits.MAX_DECODED_BYTES:
        return src.bad(msg("data.decoded_too_big", verb=verb, budget=f"{budget / 2**20:,.0f}",
                           limit=f"{limits.MAX_DECODED_BYTES / 2**20:,.0f}"))
    return src.bad(msg("data.decompression_bomb", verb=verb, budget=f"{budget / 2**20:,.1f}",
                       size=f"{file_size / 2**10:,.0f}", ratio=limits.MAX_PARQUET_RATIO))


def _check_parquet_footer(meta, file_size: int, budget: int, src: _Source) -> None:
    """Refuse from the footer alone: too many rows, or too much data after decompression
    (total_byte_size is each row group's size uncompressed, before dictionary decoding)."""
    if meta.num_rows > limits.MAX_TABLE_ROWS:
        raise _too_many_rows(src, meta.num_rows)
    uncompressed = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    if uncompressed > budget:
        raise _too_big(src, file_size, budget, msg("data.verb_decompresses"))


def _row_group_runs(meta):
    """Row-group numbers in runs of about _PARQUET_BATCH_ROWS rows, read together (one
    read per row group would be slow on a file of many small ones)."""
    run, rows = [], 0
    for i in range(meta.num_row_groups):
        run.append(i)
        rows += meta.row_group(i).num_rows
        if rows >= _PARQUET_BATCH_ROWS:
            yield run
            run, rows = [], 0
    if run:
        yield run


def _parquet_tables(reader, meta):
    """The file as Arrow tables of a run of row groups each."""
    import pyarrow as pa
    for groups in _row_group_runs(meta):
        try:
            yield reader.read_row_groups(groups)
        except pa.ArrowNotImplementedError:
            # Arrow cannot join the row groups' dictionaries under a nested column
            # ("chunked array outputs"); one row group at a time it can.
            for group in groups:
                yield reader.read_row_group(group)


def _dense_type(kind):
    """`kind` with every dictionary type replaced by its value type."""
    import pyarrow as pa
    if pa.types.is_dictionary(kind):
        return kind.value_type
    if pa.types.is_struct(kind):
        return pa.struct([f.with_type(_dense_type(f.type)) for f in kind])
    if pa.types.is_list(kind):
        return pa.list_(kind.value_field.with_type(_dense_type(kind.value_type)))
    if pa.types.is_large_list(kind):
        return pa.large_list(kind.value_field.with_type(_dense_type(kind.value_type)))
    return kind


def _decoded(table):
    """The table with dictionary columns decoded: to_pylist() is several times faster
    on plain strings than on dictionary arrays."""
    import pyarrow as pa
    schema = pa.schema([f.with_type(_dense_type(f.type)) for f in table.schema],
                       metadata=table.schema.metadata)
    try:
        return table.cast(schema)
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid):  # an exotic nesting: read as is
        return table


def _array_bytes(array) -> int:
    """Decoded size of one Arrow array, computed without decoding it: a dictionary
    array's size is the sum of its values' lengths, looked up index by index."""
    import pyarrow as pa
    import pyarrow.compute as pc
    kind = array.type
    if pa.types.is_dictionary(kind):
        values = array.dictionary
        if not (pa.types.is_string(values.type) or pa.types.is_binary(values.type)
                or pa.types.is_large_string(values.type) or pa.types.is_large_binary(values.type)):
            return array.dictionary_decode().nbytes  # numbers: at most 8 bytes a value
        lengths = pc.take(pc.binary_length(values), array.indices)
        return (pc.sum(lengths).as_py() or 0) + array.indices.nbytes
    if pa.types.is_struct(kind):
        return sum(_array_bytes(child) for child in array.flatten())
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_map(kind) \
            or pa.types.is_fixed_size_list(kind):
        return _array_bytes(array.flatten()) + 8 * len(array)  # values + offsets
    return array.nbytes


# --- format detection -----------------------------------------------------------

def _detect(keys: set[str]) -> tuple[str, dict[str, str]] | None:
    """(format, extra column mapping) recognised from a record's keys, or None."""
    return _detect_choice_format(keys) or _detect_stage_format(keys) or _detect_chat_format(keys)


def _detect_choice_format(keys: set[str]) -> tuple[str, dict[str, str]] | None:
    """A question beside lettered options: multiple choice. Two options are enough, so a
    file that lacks one is reported by the column it lacks; a bare question and answer
    is not multiple choice."""
    if "question" in keys and len(keys & set(CHOICE_LETTERS)) >= 2:
        return "choice", {}
    return None


def _detect_stage_format(keys: set[str]) -> tuple[str, dict[str, str]] | None:
    """Preference pairs (chosen or rejected) and KTO rows (a label beside a conversation
    or a prompt); a bare prompt is an RL prompt only when nothing else fits."""
    if "chosen" in keys or "rejected" in keys:
        if "conversations" in keys:
            return "sharegpt_pairs", {}
        return ("alpaca_pairs" if "instruction" in keys else "pairs"), {}
    if "label" in keys and keys & {"messages", "conversations", "prompt", "completion"}:
        return "kto", {}
    return None


def _detect_chat_format(keys: set[str]) -> tuple[str, dict[str, str]] | None:
    if "messages" in keys:
        return "openai", {}
    if "conversations" in keys:
        return "sharegpt", {}
    if "instruction" in keys:
        cols = {}
        if "output" not in keys and "response" in keys:  # dolly layout
            cols["output"] = "response"
        if "input" not in keys and "context" in keys:
            cols["input"] = "context"
        return "alpaca", cols
    answer = next((k for k in ("completion", "response", "output") if k in keys), None)
    if "prompt" in keys and answer:
        return "alpaca", {"instruction": "prompt", "output": answer}
    if "text" in keys:
        return "text", {}
    if "prompt" in keys:
        return "prompts", {}
    return None


def _mapped_keys(keys: set[str], mapped: dict[str, str]) -> set[str]:
    """A record's keys as canonical field names, through the registry's mapping."""
    renamed = {canon for canon, col in mapped.items() if col in keys}
    return renamed | (keys - set(mapped.values()))


def _settle_format(rows: list, src: _Source) -> None:
    """Fix the file's format and column mapping, checking the mapping against the file."""
    first = rows[0]
    if not isinstance(first, dict):
        raise src.bad(msg("data.expected_object", kind=_kind(first)), 1)
    keys = set(src.table) if src.table is not None else \
        set().union(*(r.keys() for r in rows if isinstance(r, dict)))
    for canon, column in src.mapped.items():
        if column not in keys:
            has = ", ".join(sorted(map(str, keys))) or msg("data.nothing")
            raise src.bad(msg("data.mapped_column_missing", registry=REGISTRY, canon=canon,
                              column=column, has=has), fld=column)
    if src.fmt is None:
        found = _detect(_mapped_keys(set(first), src.mapped))
        if found is None:
            fields = ", ".join(map(str, first)) or msg("data.none")
            raise src.bad(msg("data.unknown_format", fields=fields), 1)
        src.fmt, src.detected = found[0], True
        src.cols = {**found[1], **src.mapped}
    if src.table is not None:
        for canon in REQUIRED[src.fmt]:
            if src.col(canon) not in src.table:
                raise src.bad(msg("data.missing_column", column=src.col(canon), fmt=src.fmt,
                                  columns=", ".join(src.table)), fld=src.col(canon))


def _check_same_format(row: dict, idx: int, src: _Source) -> None:
    found = _detect(_mapped_keys(set(row), src.mapped))
    if found and found[0] != src.fmt:
        raise src.bad(msg("data.mixed_formats", found=found[0], fmt=src.fmt), idx)


# --- fields -----------------------------------------------------------------------

def _kind(value: Any) -> Msg:
    """What a JSON value is, as messages name it ("a number", "a list")."""
    if value is None:
        return msg("data.kind.null")
    if isinstance(value, bool):
        return msg("data.kind.bool")
    if isinstance(value, (int, float)):
        return msg("data.kind.number")
    if isinstance(value, str):
        return msg("data.kind.text")
    if isinstance(value, dict):
        return msg("data.kind.object")
    if isinstance(value, (list, tuple)):
        return msg("data.kind.list")
    return msg("data.kind.other", type=type(value).__name__)


def _absent(row: dict, name: str) -> Msg:
    """"null" when the field is there with no value, else "missing"."""
    return msg("data.null" if name in row else "data.missing")


def _check_text(value: str, idx: int, fld: str, src: _Source) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # "\ud800" in JSON decodes, then breaks every tokenizer
        raise src.bad(msg("data.surrogate"), idx, fld) from None
    return value


def _text(row: dict, canon: str, idx: int, src: _Source, *, required: bool,
          nonempty: bool = False) -> str | None:
    """A text field; None when an optional one is absent (or "" in a CSV)."""
    name = src.col(canon)
    value = row.get(name)
    if value is None or (src.csv and value == "" and not required):
        if required:
            raise src.bad(msg("data.absent_text", state=_absent(row, name)), idx, name)
        return None
    if not isinstance(value, str):
        raise src.bad(msg("data.expected_text", kind=_kind(value)), idx, name)
    if nonempty and not value.strip():
        raise src.bad(msg("data.empty_text"), idx, name)
    return _check_text(value, idx, name, src)


def _list(row: dict, canon: str, idx: int, src: _Source, *, required: bool,
          example: str) -> list | None:
    name = src.col(canon)
    value = row.get(name)
    if value is None or (src.csv and value == "" and not required):
        if required:
            raise src.bad(msg("data.absent_list", state=_absent(row, name), example=example),
                          idx, name)
        return None
    if src.csv and isinstance(value, str):  # lists in CSV cells are JSON-encoded
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
            raise src.bad(msg("data.expected_json_list", example=example), idx, name) from None
    if not isinstance(value, (list, tuple)):
        raise src.bad(msg("data.expected_list", example=example, kind=_kind(value)), idx, name)
    return list(value)


# --- records -> messages ---------------------------------------------------------------

def _alpaca_messages(row: dict, idx: int, src: _Source) -> list[dict]:
    prompt = _alpaca_prompt(row, idx, src)
    output = _text(row, "output", idx, src, required=True, nonempty=True)
    return prompt + [{"role": "assistant", "content": output}]


def _alpaca_prompt(row: dict, idx: int, src: _Source) -> list[dict]:
    """system, history and instruction + input: the messages up to the user's last one."""
    instruction = _text(row, "instruction", idx, src, required=True)
    extra = _text(row, "input", idx, src, required=False)
    system = _text(row, "system", idx, src, required=False)
    prompt = "\n".join(p for p in (instruction, extra) if p and p.strip())
    if not prompt:
        raise src.bad(msg("data.empty_instruction"), idx, src.col("instruction"))
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    for question, answer in _history(row, idx, src):
        messages += [{"role": "user", "content": question},
                     {"role": "assistant", "content": answer}]
    return messages + [{"role": "user", "content": prompt}]


def _history(row: dict, idx: int, src: _Source) -> list[tuple[str, str]]:
    example = '[["earlier question", "earlier answer"], ...]'
    items = _list(row, "history", idx, src, required=False, example=example) or []
    name = src.col("history")
    pairs = []
    for k, pair in enumerate(items, 1):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                and all(isinstance(t, str) and t.strip() for t in pair)):
            got = json.dumps(pair, ensure_ascii=False, default=str)[:80]
            raise src.bad(msg("data.bad_history_item", item=k, got=got), idx, name)
        pairs.append((_check_text(pair[0], idx, name, src), _check_text(pair[1], idx, name, src)))
    return pairs


def _chat_messages(row: dict, idx: int, src: _Source, canon: str | None = None,
                   prompt_hint: Msg | None = None) -> list[dict]:
    """The conversation in field `canon` (by default the format's own), with the system
    column in front. With `prompt_hint` it is a prompt and must end with the user."""
    canon = canon or ("conversations" if src.fmt in ("sharegpt", "sharegpt_pairs")
                      else "messages")
    example = ('[{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]'
               if canon == "conversations" else
               '[{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]')
    items = _list(row, canon, idx, src, required=True, example=example)
    name = src.col(canon)
    if not items:
        raise src.bad(msg("data.empty_prompt" if prompt_hint else "data.empty_conversation"),
                      idx, name)
    turns = [_turn(item, pos, idx, name, src) for pos, item in enumerate(items, 1)]
    return _ordered(_with_system(turns, row, idx, name, src), idx, name, src, prompt_hint)


def _with_system(turns: list[tuple[str, str, int]], row: dict, idx: int, name: str,
                 src: _Source) -> list[tuple[str, str, int]]:
    """`turns` with the record's system column (if any) as the first message."""
    system = _text(row, "system", idx, src, required=False)
    if not (system and system.strip()):
        return turns
    if turns and turns[0][0] == "system":
        raise src.bad(msg("data.two_system_prompts", name=name), idx, src.col("system"))
    return [("system", system, 0)] + turns


def _turn(item: Any, pos: int, idx: int, name: str, src: _Source) -> tuple[str, str, int]:
    """One conversation item -> (normalized role, content, position)."""
    if not isinstance(item, dict):
        raise src.bad(msg("data.message_not_object", pos=pos, kind=_kind(item)), idx, name)
    role_key = "from" if "from" in item else "role"
    text_key = "value" if "value" in item else "content"
    role = item.get(role_key)
    if role is None:
        raise src.bad(msg("data.message_no_role", pos=pos), idx, name)
    if not isinstance(role, str) or role.lower() not in ROLES:
        raise src.bad(msg("data.unknown_role", pos=pos, role=repr(role),
                          roles=", ".join(ROLES)), idx, name)
    content = item.get(text_key)
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        content = _join_parts(content, pos, idx, name, src)
    if not isinstance(content, str):
        raise src.bad(msg("data.message_not_text", pos=pos, key=text_key, kind=_kind(content)),
                      idx, name)
    return ROLES[role.lower()], _check_text(content, idx, name, src), pos


def _join_parts(parts: list, pos: int, idx: int, name: str, src: _Source) -> str:
    if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
               for p in parts):
        raise src.bad(msg("data.content_parts", pos=pos), idx, name)
    return "\n".join(p["text"] for p in parts)


def _ordered(turns: list[tuple[str, str, int]], idx: int, name: str, src: _Source,
             prompt_hint: Msg | None = None) -> list[dict]:
    """Check: optional system first, then user/assistant alternating, assistant last.

    With `prompt_hint` (where the reply is written instead, for the message) the turns
    are a prompt: they end with the user's message.
    """
    messages = []
    if turns[0][0] == "system":
        if turns[0][1].strip():  # an empty system prompt is harmless; drop it
            messages.append({"role": "system", "content": turns[0][1]})
        turns = turns[1:]
    if not turns:
        raise src.bad(msg("data.only_system_prompt" if prompt_hint else "data.only_system"),
                      idx, name)
    for i, (role, content, pos) in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role == "system":
            raise src.bad(msg("data.system_not_first", pos=pos), idx, name)
        if role != expected:
            why = (msg("data.why_user_first") if i == 0 else
                   msg("data.why_alternate", role=role))
            raise src.bad(msg("data.wrong_turn", pos=pos, expected=expected, why=why), idx, name)
        if not content.strip():
            raise src.bad(msg("data.empty_message", pos=pos, role=role), idx, name)
        messages.append({"role": role, "content": content})
    if prompt_hint is not None:
        if messages[-1]["role"] != "user":
            raise src.bad(msg("data.prompt_ends_assistant", pos=turns[-1][2], hint=prompt_hint),
                          idx, name)
        return messages
    if messages[-1]["role"] != "assistant":
        raise src.bad(msg("data.ends_with_user", pos=turns[-1][2]), idx, name)
    return messages


def _normalize(row: Any, idx: int, src: _Source) -> dict:
    if not isinstance(row, dict):
        raise src.bad(msg("data.expected_object", kind=_kind(row)), idx)
    if src.detected and src.table is None and idx > 1:
        _check_same_format(row, idx, src)
    if src.fmt == "text":
        record = {"text": _text(row, "text", idx, src, required=True, nonempty=True)}
    elif src.fmt == "choice":
        record = _choice_record(row, idx, src)
    elif src.fmt in CHAT_FORMATS:
        builder = _alpaca_messages if src.fmt == "alpaca" else _chat_messages
        record = {"messages": builder(row, idx, src)}
    else:
        from . import stage_data
        record = stage_data.build_record(row, idx, src)
    size = _record_chars(record)
    if size > MAX_RECORD_CHARS:
        raise src.bad(msg("data.record_too_big", size=f"{size:,}",
                          limit=f"{MAX_RECORD_CHARS:,}"), idx)
    return record


def _record_chars(record: dict) -> int:
    """Characters of text in a normalized record, whatever its shape."""
    size = 0
    for value in record.values():
        if isinstance(value, str):
            size += len(value)
        elif isinstance(value, list):  # messages, or a question's options
            size += sum(len(m) if isinstance(m, str) else len(m["content"]) for m in value)
    return size


# --- multiple choice ---------------------------------------------------------------------

_CHOICE_COLUMNS = msg("data.choice_columns")


def _choice_record(row: dict, idx: int, src: _Source) -> dict:
    """One multiple-choice row -> {"question", "choices" (the texts of A to D), "answer"
    (the right option's letter)}, texts stripped."""
    return {"question": _choice_text(row, "question", idx, src),
            "choices": [_choice_text(row, letter, idx, src) for letter in CHOICE_LETTERS],
            "answer": _choice_answer(row, idx, src)}


def _choice_text(row: dict, canon: str, idx: int, src: _Source) -> str:
    name = src.col(canon)
    value = row.get(name)
    what = msg("data.the_question") if canon == "question" else msg("data.option", letter=canon)
    if value is None:
        raise src.bad(msg("data.absent_choice", state=_absent(row, name), what=what,
                          columns=_CHOICE_COLUMNS), idx, name)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # a number as an option, as in arithmetic questions
    if not isinstance(value, str):
        raise src.bad(msg("data.choice_not_text", what=what, kind=_kind(value)), idx, name)
    if not value.strip():
        raise src.bad(msg("data.choice_empty", what=what), idx, name)
    return _check_text(value.strip(), idx, name, src)


def _choice_answer(row: dict, idx: int, src: _Source) -> str:
    name = src.col("answer")
    value = row.get(name)
    expected = msg("data.expected_letter")
    if value is None:
        raise src.bad(msg("data.absent", state=_absent(row, name), expected=expected), idx, name)
    if not isinstance(value, str):
        raise src.bad(msg("data.got", expected=expected, kind=_kind(value)), idx, name)
    letter = value.strip().upper()
    if letter not in CHOICE_LETTERS:
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise src.bad(msg("data.not_an_option", shown=repr(shown), expected=expected), idx, name)
    return letter


def read_choice(name_or_path: str, dataset_dir: str | os.PathLike = "data"
                ) -> tuple[Path, list[dict]]:
    """A multiple-choice dataset -> (its file, records {"question": str, "choices": [the
    texts of A, B, C and D], "answer": "A".."D"}).

    A file in another format (registered, or recognised from its first record) is
    refused as such; one whose format cannot be told is read as multiple choice, so
    the message names the column it lacks.
    """
    entry = resolve(name_or_path, dataset_dir)
    if entry.formatting is None:
        src = _Source(label=str(entry.path), mapped=dict(entry.columns))
        found = _detect(_mapped_keys(_first_keys(entry.path, src), src.mapped))
        entry.formatting = found[0] if found else "choice"
    records, src = _read_entry(entry)
    if src.fmt != "choice":
        raise src.bad(msg("data.not_choice", fmt=src.fmt, columns=_CHOICE_COLUMNS))
    return entry.path, records


# --- public API ------------------------------------------------------------------------

def _read_entry(entry: Entry) -> tuple[list[dict], _Source]:
    """Read and normalize a whole file (chat records or text records, by its format)."""
    src = _Source(label=str(entry.path), fmt=entry.formatting, cols=dict(entry.columns),
                  mapped=dict(entry.columns))
    rows = _read_rows(entry.path, src)
    if not rows:
        raise src.bad(msg("data.no_records"))
    _settle_format(rows, src)
    return [_normalize(row, idx, src) for idx, row in enumerate(rows, 1)], src


def fill_placeholders(text: str, identity: tuple[str, str]) -> str:
    """Replace {{name}} and {{author}}."""
    if "{{" not in text:  # the common case, and the regex is the slow part of reading
        return text
    name, author = identity
    return _PLACEHOLDER.sub(lambda m: name if m.group(1) == "name" else author, text)


def _for_stage(records: list[dict], src: _Source, stage: str) -> list[dict]:
    """The records as `stage` trains on them, or BadInput when it cannot use this kind."""
    if stage not in STAGES:
        raise BadInput(msg("data.unknown_stage", stage=stage, stages=", ".join(STAGES)),
                       field="stage")
    from . import stage_data
    kind = FORMAT_KIND[src.fmt]
    if kind in EVAL_KINDS:
        raise src.bad(msg("data.choice_not_for_training", stage=stage,
                          needs=stage_data.NEEDS[stage]))
    if kind not in STAGE_KINDS[stage]:
        raise src.bad(stage_data.mismatch(kind, stage))
    return stage_data.convert(records, kind, stage)


def _fill_all(records: list[dict], identity: tuple[str, str] | None) -> list[dict]:
    """Placeholders filled in every text of every record (messages, prompt and replies)."""
    if identity is None:
        return records
    return [_fill_record(r, identity) for r in records]


def _fill_record(record: dict, identity: tuple[str, str]) -> dict:
    out = {}
    for key, value in record.items():
        if isinstance(value, str):
            value = fill_placeholders(value, identity)
        elif isinstance(value, list):
            value = [{"role": m["role"], "content": fill_placeholders(m["content"], identity)}
                     for m in value]
        out[key] = value
    return out


def read_dataset(name_or_path: str, dataset_dir: str = "data", stage: str = "sft",
                 identity: tuple[str, str] | None = None) -> tuple[list[dict], str]:
    """One dataset -> (normalized records, format name).

    sft records are {"messages": [...]}, pt records {"text": ...}; rm and dpo records
    {"prompt": [...], "chosen": str, "rejected": str}, kto records {"prompt": [...],
    "completion": str, "label": bool}, grpo records {"prompt": [...], "answer": str|None},
    each prompt ending with the user's message. `identity` (name, author) fills the
    {{name}} and {{author}} placeholders.
    """
    records, src = _read_entry(resolve(name_or_path, dataset_dir))
    return _fill_all(_for_stage(records, src, stage), identity), src.fmt


def load_records(config) -> list[dict]:
    """Every dataset in `config.dataset`, placeholders filled, `max_samples` each."""
    identity = (config.identity_name, config.identity_author)
    records = []
    for name in config.dataset:
        rows, _ = read_dataset(name, config.dataset_dir, config.stage, identity)
        records += rows[:config.max_samples] if config.max_samples else rows
    return records


def dataset_kind(name_or_path: str, dataset_dir: str | os.PathLike = "data") -> str:
    """What a dataset holds: "chat", "text", "pairs", "kto", "prompts" (see STAGE_KINDS)
    or "choice" (multiple choice, for evaluation only).

    Reads as little as it can: a registered entry's formatting when it names one,
    otherwise the first record's fields (a CSV's header, a Parquet file's schema).
    """
    entry = resolve(name_or_path, dataset_dir)
    if entry.formatting:
        return FORMAT_KIND[entry.formatting]
    src = _Source(label=str(entry.path), cols=dict(entry.columns), mapped=dict(entry.columns))
    keys = _first_keys(entry.path, src)
    found = _detect(_mapped_keys(keys, src.mapped))
    if found is None:
        fields = ", ".join(sorted(map(str, keys))) or msg("data.none")
        raise src.bad(msg("data.unknown_format_short", fields=fields), 1)
    return FORMAT_KIND[found[0]]


def datasets_for_stage(stage: str, dataset_dir: str | os.PathLike = "data") -> list[str]:
    """Registered names whose kind of data `stage` trains on, in registry order. An entry
    that cannot be read is left out (reading it for training says what is wrong)."""
    if stage not in STAGES:
        raise BadInput(msg("data.unknown_stage", stage=stage, stages=", ".join(STAGES)),
                       field="stage")
    try:
        names = list_datasets(dataset_dir)
    except BadInput:
        return []
    fitting = []
    for name in names:
        try:
            kind = dataset_kind(name, dataset_dir)
        except (BadInput, OSError, ValueError):
            continue
        if kind in STAGE_KINDS[stage]:
            fitting.append(name)
    return fitting


def _first_keys(path: Path, src: _Source) -> set[str]:
    """The field names of a file's first record, reading no further than needed."""
    ext = path.suffix.lower()
    if ext == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            return set(pq.read_schema(path).names)
        except (pa.ArrowException, OSError, ValueError) as err:
            raise src.bad(msg("data.not_parquet", error=str(err))) from None
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            if ext == ".csv":
                return {h.strip() for h in next(csv.reader(handle), [])}
            if ext == ".jsonl":
                first = next((line for line in handle if line.strip()), None)
                if first is None:
                    raise src.bad(msg("data.no_records"))
                return _keys_of(_parse_json(first, src.label), src)
    except UnicodeDecodeError:
        raise src.bad(msg("data.not_utf8")) from None
    except (OSError, csv.Error) as err:
        raise src.bad(msg("data.cannot_read", error=str(err))) from None
    text = _decode(_read_bytes(path), src.label)
    start = _NONBLANK.search(text)
    if start is None or text[start.start()] != "[":
        raise src.bad(msg("data.expected_list_top"))
    first = _NONBLANK.search(text, start.end())
    if first is None or text[first.start()] == "]":
        raise src.bad(msg("data.no_records"))
    try:
        value = json.JSONDecoder().raw_decode(text, first.start())[0]
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        raise src.bad(msg("data.invalid_first_record")) from None
    return _keys_of(value, src)


def _keys_of(record: Any, src: _Source) -> set[str]:
    if not isinstance(record, dict):
        raise src.bad(msg("data.expected_object", kind=_kind(record)), 1)
    return set(record)


# --- uploads ----------------------------------------------------------------------------

def _safe_name(raw: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", raw).strip("._-")[:64]
    return name or "upload"


def _unique(name: str, taken) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    return candidate


def register_file(src_path: str | os.PathLike, dataset_dir: str = "data",
                  name: str | None = None) -> str:
    """Validate an uploaded file, copy it to <dataset_dir>/uploads/ and register it.

    Returns the registered name. The registry is rewritten atomically.
    """
    from .runs import write_atomic
    src = Path(src_path)
    if not _exists(src, "file"):
        raise BadInput(msg("data.file_not_found"), file=str(src)[:200])
    _check_file(src)
    size = src.stat().st_size
    if size > MAX_UPLOAD_BYTES:
        raise BadInput(msg("data.upload_too_big", size=f"{size / 2**20:,.0f}",
                           limit=f"{MAX_UPLOAD_BYTES / 2**20:,.0f}"), file=str(src))
    records, source = _read_entry(Entry(src))  # validates every record before copying
    folder = data_dir(dataset_dir)
    if paths.confined():  # written, so only inside the allowed roots (not the bundled data)
        folder = paths.confine(folder, "dataset_dir")
    (folder / "uploads").mkdir(parents=True, exist_ok=True)
    if paths.confined():  # an uploads/ that is a link out is refused too
        paths.confine(folder / "uploads", "dataset_dir")
    # The registry's read-modify-write is serialised between processes; the lock file
    # lives in uploads/, the writable part.
    with locks.held(folder / "uploads" / ".lock"):
        registry = read_registry(folder)
        wanted = _safe_name(name or src.stem)
        if name and wanted in registry:
            raise BadInput(msg("data.name_taken", name=wanted), field="name")
        key = _unique(wanted, registry)
        taken = {p.name for p in (folder / "uploads").iterdir()}
        file_name = _unique(key, {Path(t).stem for t in taken}) + src.suffix.lower()
        tmp = folder / "uploads" / f".{file_name}.partial"
        shutil.copyfile(src, tmp)
        os.replace(tmp, folder / "uploads" / file_name)
        registry[key] = {"file_name": f"uploads/{file_name}", "formatting": source.fmt,
                         "description": f"Uploaded from {src.name}: {len(records)} records",
                         "tags": ["upload"]}
        if source.cols:
            registry[key]["columns"] = source.cols
        write_atomic(folder / REGISTRY, json.dumps(registry, indent=2, ensure_ascii=False) + "\n")
    return key


# --- tunebench data check ------------------------------------------------------------------

def _marker(stream) -> tuple[str, str]:
    if stream.isatty():
        return "\x1b[1;32m", "\x1b[0m"  # bold green
    try:
        "⟦⟧".encode(stream.encoding or "utf-8")
        return "⟦", "⟧"
    except (UnicodeEncodeError, LookupError):
        return "[[", "]]"


def _marked(segments: list[tuple[str, bool]], marks: tuple[str, str]) -> str:
    return "".join(f"{marks[0]}{text}{marks[1]}" if trained else text
                   for text, trained in segments)


def _scope(sampled: int, total: int) -> Msg:
    """Which records a length summary covers: "first 1000 of 5000" or "all 12"."""
    if sampled < total:
        return msg("data.check.scope_first", sampled=sampled, total=total)
    return msg("data.check.scope_all", total=total)


def _length_summary(lengths: list[int], cutoff: int, sampled: int, total: int) -> str:
    over = sum(n > cutoff for n in lengths)
    return t("data.check.lengths", scope=_scope(sampled, total), min=min(lengths),
             median=f"{statistics.median(lengths):g}", max=max(lengths), over=over,
             cutoff=cutoff)


def _print_header(entry: Entry, records: list[dict], src: _Source, mapping: str = "") -> None:
    """The first lines of `data check`: which file, how many records, which format."""
    print(t("data.check.dataset", name=str(entry.name or entry.path), path=str(entry.path)))
    print(t("data.check.records", n=len(records)))
    print(t("data.check.format", fmt=src.fmt,
            detected=msg("data.check.detected") if src.detected else "",
            columns=msg("data.check.columns", mapping=mapping) if mapping else ""))


def check_command(dataset: str, dataset_dir: str = "data", model: str = "demo",
                  template: str = "auto", stage: str = "auto") -> int:
    """`tunebench data check`: count, format and the first example as trained.

    model "none" skips the tokenized preview (no tokenizer is loaded). A `stage`
    other than "auto" reads the file as training for that stage would; "auto" shows
    it for the stage its kind of data suggests (KIND_STAGE).
    """
    from . import stage_data
    from .config import default_value
    identity = (default_value("identity_name"), default_value("identity_author"))
    entry = resolve(dataset, dataset_dir)
    records, src = _read_entry(entry)
    if FORMAT_KIND[src.fmt] in EVAL_KINDS and stage == "auto":
        return _print_choice_check(entry, records, src)
    shown = KIND_STAGE[FORMAT_KIND[src.fmt]] if stage == "auto" else stage
    records = _fill_all(_for_stage(records, src, shown), identity)
    mapping = ", ".join(f"{k} <- {v}" for k, v in src.cols.items() if k != v)
    _print_header(entry, records, src, mapping)
    print(t("data.check.stage", stage=shown, what=stage_data.STAGE_DATA[shown]))
    if model.lower() == "none":
        print(t("data.check.first_record") + "\n"
              + json.dumps(records[0], ensure_ascii=False, indent=2))
    elif shown in ("sft", "pt"):
        _print_tokenized(records, model, template)
    else:
        stage_data.print_preview(records, shown, model, template)
    return 0


def _print_choice_check(entry: Entry, records: list[dict], src: _Source) -> int:
    """`data check` of a multiple-choice file: no stage trains on it, so no token view."""
    _print_header(entry, records, src)
    print(t("data.check.use_choice"))
    print(t("data.check.first_record") + "\n"
          + json.dumps(records[0], ensure_ascii=False, indent=2))
    return 0


def _print_tokenized(records: list[dict], model: str, template: str) -> None:
    from .config import default_value
    from .models import load_tokenizer
    from .templates import encode_example, trained_segments
    tokenizer = load_tokenizer(model, template)
    cutoff = default_value("cutoff_len")
    first = encode_example(records[0], tokenizer, cutoff)
    trained = sum(label != -100 for label in first["labels"])
    marks = _marker(sys.stdout)
    print("\n" + t("data.check.as_model_sees", cutoff=cutoff, open=marks[0], close=marks[1]))
    print(_marked(trained_segments(tokenizer, first["input_ids"], first["labels"]), marks))
    print("\n" + t("data.check.trained_tokens", trained=trained, total=len(first["input_ids"])))
    sample = records[:1000]  # lengths of more records cost more than they tell
    lengths = [len(encode_example(r, tokenizer, 10**9)["input_ids"]) for r in sample]
    print(_length_summary(lengths, cutoff, len(sample), len(records)))
