"""Every cost limit, declared once.

Input that is small on the wire can be huge once read: a 383-byte YAML file whose
aliases expand a billion-fold, a 35 KB Parquet file that decodes to hundreds of MB,
a name of fifty million characters. Each limit below bounds one such cost; the
readers refuse past it with a `BadInput` that names the limit, before the cost is
paid. Tests lower a limit with monkeypatch, so code reads them as `limits.NAME`
at call time rather than copying the value.

`check_text` / `check_path_text` vet one text value; `quote` is how any error
message shows user data (bounded, however big or nested the value is).
"""

from __future__ import annotations

import os
import re
import reprlib
from typing import Any

from .errors import BadInput
from .i18n import msg

KiB, MiB, GiB = 2**10, 2**20, 2**30

# --- config files -------------------------------------------------------------------

# A config that sets every key, with comments, is about 4 KB; 256 KiB leaves ample
# room yet refuses a stray data file before it is read into memory.
MAX_CONFIG_BYTES = 256 * KiB
# YAML aliases (*name) share one node, so a tiny file can stand for a billion values
# ("billion laughs"). A full config is about 100 values once aliases are written out.
MAX_YAML_NODES = 10_000
# One YAML value. The longest setting is a path (MAX_PATH_BYTES); this is well above
# it, so a long value still gets that setting's own message, while YAML's sexagesimal
# numbers (1:2:3:..., each part a multiplication of a growing integer) stay cheap:
# 240 KB of them takes PyYAML 2.6 s to construct, 10,000 characters takes 5 ms.
MAX_YAML_SCALAR_CHARS = 10_000

# --- text settings --------------------------------------------------------------------

# Linux's PATH_MAX is 4096 bytes counting the final NUL; a longer path fails in the
# kernel with ENAMETOOLONG.
MAX_PATH_BYTES = 4095
# NAME_MAX: one file or folder name may be at most 255 bytes on ext4, XFS, btrfs,
# APFS and NTFS; a longer one gives "[Errno 36] File name too long".
MAX_PATH_COMPONENT_BYTES = 255
# identity_name / identity_author are spliced into every training example; a
# sentence is plenty, and a long one would crowd out the text around it.
MAX_NAME_CHARS = 200
# run_name becomes a folder name and a row label in the runs list.
MAX_RUN_NAME_CHARS = 64
# lora_target: comma-separated module names; every projection of a large model
# (about a dozen names of 10-20 characters) fits in a quarter of this.
MAX_LORA_TARGET_CHARS = 1024
# Any other text setting (choice names such as a template or scheduler); the longest
# valid value is about 20 characters.
MAX_SETTING_CHARS = 200
# Entries of a list setting (datasets per run). Each is read in full, so this also
# bounds the work one config can ask for.
MAX_LIST_ITEMS = 64
# A chat message, system prompt or the probe list typed into the page. Far more than any
# context window holds, yet small enough that tokenizing it never stalls the chat worker.
MAX_MESSAGE_CHARS = 100_000

# --- error messages -------------------------------------------------------------------

# Characters of user data quoted in one error message: enough to recognise the value.
MAX_QUOTE_CHARS = 200
# Config problems listed in one message; the rest are counted. A mapping with
# thousands of bad keys still gives a readable message.
MAX_REPORTED_PROBLEMS = 20

# --- datasets ---------------------------------------------------------------------------

# Largest upload accepted by the page (register_file). Big enough for hundreds of
# thousands of chat examples.
MAX_UPLOAD_BYTES = 200 * MiB
# One record's text; bigger is almost surely a broken file (a whole book in one cell).
MAX_RECORD_CHARS = 10_000_000
# Records per file. A million examples is far beyond what a fine-tune on one
# machine uses, and each record costs several hundred bytes of Python objects on
# top of its text, so this bounds memory even for tiny records.
MAX_TABLE_ROWS = 1_000_000
# Decoded data per file: the bytes of a .json/.jsonl/.csv file, or a Parquet file's
# values once decompressed. Held in memory as Python strings (about twice this).
MAX_DECODED_BYTES = 1 * GiB
# Parquet decoding to more than this many times its size on disk is refused as a
# decompression bomb: text compresses 3-10x, and a repeated column (one system
# prompt on every row) rarely reaches 30x, while a bomb reaches 10,000x.
MAX_PARQUET_RATIO = 100
# Below this decoded size any ratio is fine: a small file of repeated rows costs
# little, and the bound keeps what a refused bomb leaves decoded small.
PARQUET_RATIO_FLOOR_BYTES = 8 * MiB

_DESCRIPTIONS = {
    "MAX_CONFIG_BYTES": "size of a YAML config file",
    "MAX_YAML_NODES": "values in a YAML config once its aliases (*name) are expanded",
    "MAX_YAML_SCALAR_CHARS": "characters of one value in a YAML config",
    "MAX_PATH_BYTES": "bytes of a path setting (model, dataset_dir, output_dir, resume, each "
                      "dataset), in UTF-8",
    "MAX_PATH_COMPONENT_BYTES": "bytes of one file or folder name within a path, in UTF-8",
    "MAX_NAME_CHARS": "characters of identity_name and identity_author",
    "MAX_RUN_NAME_CHARS": "characters of run_name",
    "MAX_LORA_TARGET_CHARS": "characters of lora_target",
    "MAX_SETTING_CHARS": "characters of any other text setting",
    "MAX_LIST_ITEMS": "entries of a list setting (datasets per run)",
    "MAX_MESSAGE_CHARS": "characters of a chat message, system prompt or probe list in the page",
    "MAX_QUOTE_CHARS": "characters of user data quoted in one error message",
    "MAX_REPORTED_PROBLEMS": "config problems listed in one message (the rest are counted)",
    "MAX_UPLOAD_BYTES": "size of an uploaded dataset file",
    "MAX_RECORD_CHARS": "characters of text in one dataset record",
    "MAX_TABLE_ROWS": "records in one dataset file",
    "MAX_DECODED_BYTES": "decoded data in one dataset file (Parquet: after decompression)",
    "MAX_PARQUET_RATIO": "times a Parquet file may grow when decoded (above the floor below)",
    "PARQUET_RATIO_FLOOR_BYTES": "decoded size below which a Parquet file may grow any amount",
}


def human(name: str, value: int) -> str:
    """A limit's value in the unit a reader expects (sizes in KiB/MiB/GiB)."""
    if name.endswith("_BYTES") and value >= KiB and name not in (
            "MAX_PATH_BYTES", "MAX_PATH_COMPONENT_BYTES"):
        for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
            if value >= size:
                return f"{value / size:g} {unit}"
    if name.endswith("_RATIO"):
        return f"{value:,}x"
    if name.endswith("_BYTES"):
        return f"{value:,} bytes"
    return f"{value:,}"


def describe_limits() -> list[tuple[str, str]]:
    """(name, "value: what it bounds") for each limit, for the README's Security section.

    Reads the current values, so a patched limit shows as patched.
    """
    values = globals()
    return [(name, f"{human(name, values[name])}: {what}") for name, what in _DESCRIPTIONS.items()]


# --- quoting user data ---------------------------------------------------------------------

class _BoundedRepr(reprlib.Repr):
    """reprlib's repr, made cheap on any size: no sorting of big dicts or sets (reprlib
    sorts them whole), and ints too long for repr() are described, not printed."""

    def __init__(self):
        super().__init__()
        self.maxlevel = 3
        self.maxdict = self.maxlist = self.maxtuple = self.maxset = 6
        self.maxfrozenset = self.maxdeque = self.maxarray = 6
        self.maxstring = 60
        self.maxlong = 40
        self.maxother = 60

    def repr_dict(self, x, level):
        if not x:
            return "{}"
        if level <= 0:
            return "{...}"
        items = []
        for n, key in enumerate(x):
            if n == self.maxdict:
                items.append("...")
                break
            items.append(f"{self.repr1(key, level - 1)}: {self.repr1(x[key], level - 1)}")
        return "{" + ", ".join(items) + "}"

    def _repr_unsorted(self, x, level, left, right, maxiter):
        if not x:
            return f"{type(x).__name__}()"
        if level <= 0:
            return left + "..." + right
        items = []
        for n, item in enumerate(x):
            if n == maxiter:
                items.append("...")
                break
            items.append(self.repr1(item, level - 1))
        return left + ", ".join(items) + right

    def repr_set(self, x, level):
        return self._repr_unsorted(x, level, "{", "}", self.maxset)

    def repr_frozenset(self, x, level):
        return self._repr_unsorted(x, level, "frozenset({", "})", self.maxfrozenset)

    def repr_int(self, x, level):
        if x.bit_length() > 4 * self.maxlong:  # repr() of a huge int is slow, or refused
            return f"<a {x.bit_length():,}-bit number>"
        return super().repr_int(x, level)


_REPR = _BoundedRepr()


def quote(value: Any, limit: int | None = None) -> str:
    """repr(value), cut to `limit` characters (MAX_QUOTE_CHARS by default).

    A cut string ends with "… (N characters)", giving the full length. Cheap on huge
    or deeply nested values: only the part that is shown is ever looked at.
    """
    limit = MAX_QUOTE_CHARS if limit is None else limit
    if isinstance(value, (str, bytes, bytearray)):
        text, size = repr(value[:limit]), len(value)
        if size <= limit and len(text) <= limit:
            return text
        return f"{text[:limit]}… ({size:,} characters)"
    text = _REPR.repr(value)
    if len(text) <= limit:
        return text
    return text[:limit] + "…"


# --- vetting text values ---------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f]")
_CONTROL_MULTILINE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")  # tab, newline, CR allowed
# The characters named in a message (config.limits.char.<name> in the catalogues).
_CONTROL_NAMES = {0: "nul", 9: "tab", 10: "newline", 13: "carriage_return", 27: "escape"}


def check_text(value: str, field: str, max_chars: int, *, multiline: bool = False) -> str:
    """Return `value` if it is plain text of at most `max_chars` characters.

    Refused (BadInput naming `field`): longer text, C0 control characters (NUL and
    the like; tab, newline and CR too unless `multiline`), and lone surrogates, which
    no file, path or tokenizer can take.
    """
    if len(value) > max_chars:
        raise BadInput(msg("config.limits.too_long", size=f"{len(value):,}",
                           most=f"{max_chars:,}", got=quote(value)), field=field)
    bad = (_CONTROL_MULTILINE if multiline else _CONTROL).search(value)
    if bad:
        code = ord(bad.group())
        name = msg("config.limits.char." + _CONTROL_NAMES.get(code, "control"))
        raise BadInput(msg("config.limits.control_multiline" if multiline else
                           "config.limits.control", name=name, code=f"{code:04X}",
                           position=bad.start() + 1, got=quote(value)), field=field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise BadInput(msg("config.limits.surrogate", code=f"{ord(value[err.start]):04X}",
                           position=err.start + 1, got=quote(value)), field=field) from None
    return value


_SEPARATORS = re.compile("[" + re.escape("".join({"/", os.sep, os.altsep or "/"})) + "]")


def check_path_text(value: str, field: str, max_bytes: int | None = None) -> str:
    """`check_text` for a path: at most MAX_PATH_BYTES bytes in UTF-8, and no file or
    folder name in it over MAX_PATH_COMPONENT_BYTES (the file system's own limits, so
    the user gets this message rather than "[Errno 36] File name too long")."""
    max_bytes = MAX_PATH_BYTES if max_bytes is None else max_bytes
    check_text(value, field, max_bytes)  # a character is at least one byte
    size = len(value.encode("utf-8"))
    if size > max_bytes:
        raise BadInput(msg("config.limits.path_too_long", size=f"{size:,}",
                           most=f"{max_bytes:,}", got=quote(value)), field=field)
    for part in _SEPARATORS.split(value):
        size = len(part.encode("utf-8"))
        if size > MAX_PATH_COMPONENT_BYTES:
            raise BadInput(msg("config.limits.name_too_long", size=f"{size:,}",
                               most=MAX_PATH_COMPONENT_BYTES, got=quote(part)), field=field)
    return value
