"""How settings are declared and read: one machinery for every job's schema.

A schema is a dataclass whose fields are made with `setting(...)`: each carries its
type, default, bounds, help text, group and widget hint. The training config, the
generation settings and the export settings (core/config.py) are such schemas. From a
schema, and nothing else, come the YAML loader, the CLI's KEY=VALUE overrides and
flags, `--help`, and the web forms.

Reading goes: raw mapping -> `coerce` each value by its field's type and bounds ->
the dataclass -> the schema's cross-field rules. Any problem is `BadInput`, raised
before a model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Callable

import yaml

from . import limits
from .errors import BadInput, Problems
from .i18n import Msg, msg


class Invalid(ValueError):
    """A value a setting cannot take: the short reason as a message (core.i18n.Msg), to
    which the caller adds the key name and the value. str() renders it."""

    def __init__(self, key: str, /, **params: Any):
        self.what = msg(key, **params)
        super().__init__(self.what.text("en"))

    def __str__(self) -> str:
        return self.what.text()


def setting(default: Any, help: str, group: str, *, min: float | None = None,
            max: float | None = None, choices: tuple | None = None, advanced: bool = False,
            methods: tuple[str, ...] | None = None, stages: tuple[str, ...] | None = None,
            tasks: tuple[str, ...] | None = None,
            widget: str | None = None, max_len: int | None = None, path: bool = False,
            multiline: bool = False, flag: str | None = None) -> Any:
    """A dataclass field with the metadata every front end reads.

    `methods` limits a setting to some tuning methods, `stages` to some training stages,
    `tasks` to some eval tasks (the form hides it otherwise);
    `advanced` folds it away in the form; `widget` overrides the widget guessed
    from the type ("slider", "textbox", ...). Text is at most `max_len` characters
    (each entry, for a list); a `path` setting is at most `limits.MAX_PATH_BYTES`
    bytes, with no file or folder name over the file system's limit. Text settings
    without a `max_len` get `limits.MAX_SETTING_CHARS`; `multiline` text keeps its
    line breaks. `flag` is a command-line option that sets it (e.g. "--temperature"),
    for commands that take flags rather than KEY=VALUE.
    """
    if path:
        max_len = limits.MAX_PATH_BYTES
    elif max_len is None and isinstance(default, (str, list)):
        max_len = limits.MAX_SETTING_CHARS
    meta = dict(help=help, group=group, min=min, max=max, choices=choices,
                advanced=advanced, methods=methods, stages=stages, tasks=tasks, widget=widget,
                max_len=max_len, path=path, multiline=multiline, flag=flag)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def borrow(schema: type, name: str, **changes: Any) -> Any:
    """A new field declared as `schema`'s `name` is (same default, help, bounds), for a job
    schema that shares a setting with another: the declaration stays in one place.
    `changes` overrides metadata where the meaning narrows (e.g. another group)."""
    f = fields(schema)[name]
    meta = {**f.metadata, **changes}
    if f.default is dataclasses.MISSING:
        return field(default_factory=f.default_factory, metadata=meta)
    return field(default=f.default, metadata=meta)


@functools.cache
def fields(schema: type) -> dict[str, dataclasses.Field]:
    """The schema's fields by name, in declaration order."""
    return {f.name: f for f in dataclasses.fields(schema)}


@functools.cache
def types(schema: type) -> dict[str, Any]:
    return typing.get_type_hints(schema)


def default_value(schema: type, name: str) -> Any:
    f = fields(schema)[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def fields_in(schema: type, group: str) -> list[dataclasses.Field]:
    """The fields of one group, in declaration order (the order of the form)."""
    return [f for f in fields(schema).values() if f.metadata["group"] == group]


# --- coercion: one raw value -> the field's type --------------------------------

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _to_bool(raw: Any, name: str = "", meta: dict | None = None) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
        return raw.strip().lower() in _TRUE
    raise Invalid("config.expected_bool")


def _to_int(raw: Any, name: str = "", meta: dict | None = None) -> int:
    if isinstance(raw, bool):
        raise Invalid("config.expected_int")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if isinstance(raw, str):
        try:
            return int(raw.strip())
        except ValueError:
            pass
    raise Invalid("config.expected_int")


def _to_float(raw: Any, name: str = "", meta: dict | None = None) -> float:
    if isinstance(raw, bool):
        raise Invalid("config.expected_number")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise Invalid("config.expected_number") from None
    except OverflowError:  # an integer with hundreds of digits
        raise Invalid("config.expected_finite") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise Invalid("config.expected_finite")
    return value


def _vet(name: str, text: str, meta: dict) -> str:
    """Refuse text the setting `name` cannot take (too long, control characters, lone
    surrogates, a path the file system would refuse) with a BadInput naming it."""
    if meta["path"]:
        return limits.check_path_text(text, name, meta["max_len"])
    return limits.check_text(text, name, meta["max_len"] or limits.MAX_SETTING_CHARS,
                             multiline=meta.get("multiline", False))


def _to_str(raw: Any, name: str, meta: dict) -> str:
    if isinstance(raw, (dict, list)) or raw is None:
        raise Invalid("config.expected_text")
    text = str(raw) if meta.get("multiline") else str(raw).strip()
    return _vet(name, text, meta)


def _to_str_list(raw: Any, name: str, meta: dict) -> list[str]:
    most = limits.MAX_LIST_ITEMS
    if isinstance(raw, str):
        parts = raw.split(",", most)  # never more than one piece past the limit
        if len(parts) > most:
            raise Invalid("config.list_over_limit", most=most)
        items = [_vet(name, part.strip(), meta) for part in parts]
    elif isinstance(raw, list):
        if len(raw) > most:
            raise Invalid("config.list_too_long", count=f"{len(raw):,}", most=most)
        items = [_to_str(item, name, meta) for item in raw]
    else:
        raise Invalid("config.expected_list")
    items = [item for item in items if item]
    if not items:
        raise Invalid("config.expected_entry")
    return items


def _to_bool_or_path(raw: Any, name: str, meta: dict) -> bool | str:
    try:
        return _to_bool(raw)
    except ValueError:
        return _to_str(raw, name, meta)


# Each converter takes (raw value, setting name); only the text ones use the name,
# to look up the setting's length limit and to name it when refusing.
_COERCE = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str,
           list[str]: _to_str_list, bool | str: _to_bool_or_path}


def coerce(schema: type, name: str, raw: Any) -> Any:
    """Convert one raw value (from YAML, the CLI or the form) to the field's type.

    Raises Invalid (a ValueError) with a short reason, to which the caller adds the key
    name and the value; or, for text the setting cannot take, BadInput naming the key and
    quoting the value (`limits.check_text`).
    """
    meta = fields(schema)[name].metadata
    if raw in ([], "") and default_value(schema, name) == []:
        return []  # a list that is empty by default may be emptied again
    value = _COERCE[types(schema)[name]](raw, name, meta)
    if meta["choices"] is not None and value not in meta["choices"]:
        raise Invalid("config.expected_choice", choices=", ".join(map(str, meta["choices"])))
    if meta["min"] is not None and value < meta["min"]:
        raise Invalid("config.at_least", min=f"{meta['min']:g}")
    if meta["max"] is not None and value > meta["max"]:
        raise Invalid("config.at_most", max=f"{meta['max']:g}")
    return value


def _unknown_key(schema: type, key: Any, suggest: bool = True) -> Msg:
    """"unknown key 'x'", with the closest setting name when one is near."""
    text = key if isinstance(key, str) else limits.quote(key, 64)
    # difflib is quadratic in the key's length: only look for short, plausible keys
    close = difflib.get_close_matches(text, fields(schema), n=1) if suggest and len(text) <= 64 else []
    if close:
        return msg("config.unknown_key_close", key=limits.quote(text, 64), close=close[0])
    return msg("config.unknown_key", key=limits.quote(text, 64))


def _capped(problems: list[Msg]) -> list[Msg]:
    """The first MAX_REPORTED_PROBLEMS problems, and a count of the rest."""
    most = limits.MAX_REPORTED_PROBLEMS
    if len(problems) <= most:
        return problems
    return problems[:most] + [msg("config.more_problems", count=f"{len(problems) - most:,}")]


def build(schema: type, raw: dict, source: str | None = None,
          rules: Callable[[Any], list[Msg]] | None = None) -> Any:
    """A schema instance from a plain mapping, collecting every problem before failing.

    `rules` is the schema's cross-field check (a list of problems, empty when fine).
    """
    if not isinstance(raw, dict):
        raise BadInput(msg("config.expected_mapping"), file=source)
    problems, values = [], {}
    for key, value in raw.items():
        if key not in fields(schema):
            problems.append(_unknown_key(schema, key,
                                         suggest=len(problems) < limits.MAX_REPORTED_PROBLEMS))
            continue
        try:
            values[key] = coerce(schema, key, value)
        except BadInput as err:  # already names the problem and quotes the value
            problems.append(msg("config.key_problem", key=key, what=err.what))
        except Invalid as err:
            problems.append(msg("config.value_problem", key=key, why=err.what,
                                got=limits.quote(value)))
    if problems:
        raise Problems(_capped(problems), file=source)
    instance = schema(**values)
    problems = rules(instance) if rules else []
    if problems:
        raise Problems(problems, file=source)
    return instance


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """KEY=VALUE strings from the command line -> a mapping of raw strings."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise BadInput(msg("config.expected_pair", got=limits.quote(pair)))
        out[key.strip()] = value
    return out


class _ConfigLoader(yaml.SafeLoader):
    """yaml.safe_load's loader (never constructs Python objects), which also refuses a
    document that costs far more than its size: values longer than any setting, and
    aliases that expand past MAX_YAML_NODES values ("billion laughs"). Both are found
    on the composed node graph, which stays small because an alias shares its node,
    before a single Python object is built."""

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return self.construct_document(node)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a node graph that expands to more than MAX_YAML_NODES values.

    Iterative depth-first walk (a deeply nested file must not exhaust the stack);
    each distinct node's expanded size is computed once (memoised by id), so the
    walk costs the graph's size, not the expansion's.
    """
    most = limits.MAX_YAML_NODES
    sizes: dict[int, int] = {}
    on_path: set[int] = set()  # the nodes being expanded: meeting one again is a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[key] > most or len(sizes) > most:
                raise _too_big(len(sizes) > most, node)
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise BadInput(msg("config.yaml.alias_cycle"))
        if isinstance(node, yaml.ScalarNode) and len(node.value) > limits.MAX_YAML_SCALAR_CHARS:
            raise BadInput(msg("config.yaml.long_value", line=node.start_mark.line + 1,
                               size=f"{len(node.value):,}",
                               most=f"{limits.MAX_YAML_SCALAR_CHARS:,}"))
        on_path.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in sizes)


def _too_big(distinct: bool, node: yaml.Node) -> BadInput:
    most = limits.MAX_YAML_NODES
    if distinct:
        return BadInput(msg("config.yaml.too_many", most=f"{most:,}"))
    return BadInput(msg("config.yaml.expands", most=f"{most:,}"))


def _short(text: str) -> str:
    """One line of at most MAX_QUOTE_CHARS characters (YAML's messages quote the input)."""
    text = " ".join(str(text).split())
    most = limits.MAX_QUOTE_CHARS
    return text if len(text) <= most else text[:most] + "…"


def _yaml_error(err: yaml.YAMLError) -> Msg:
    """A short "invalid YAML" message: where, and what PyYAML found, without its
    multi-line snippet of the file."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem:
        mark = err.problem_mark
        # PyYAML's own words (context, problem) stay as it wrote them
        detail = (f"{_short(err.context)}: " if err.context else "") + _short(err.problem)
        if mark:
            return msg("config.yaml.invalid_at", line=mark.line + 1, column=mark.column + 1,
                       detail=detail)
        return msg("config.yaml.invalid", detail=detail)
    return msg("config.yaml.invalid", detail=_short(str(err)))


def _read_config_text(path: Path) -> str:
    """The file's text, refusing one larger than MAX_CONFIG_BYTES before reading it."""
    most = limits.MAX_CONFIG_BYTES
    try:
        size = path.stat().st_size
        if size > most:
            raise BadInput(msg("config.file.too_big", size=f"{size:,}", most=f"{most:,}"),
                           file=str(path))
        with path.open("rb") as handle:
            data = handle.read(most + 1)  # bounded even if the file grows meanwhile
    except FileNotFoundError:
        raise BadInput(msg("config.file.not_found"), file=str(path)) from None
    except IsADirectoryError as err:
        raise BadInput(msg("config.file.cannot_read", error=str(err)), file=str(path)) from None
    except (OSError, ValueError) as err:  # no permission, a NUL in the name
        raise BadInput(msg("config.file.cannot_read",
                           error=str(getattr(err, "strerror", None) or err)),
                       file=str(path)) from None
    if len(data) > most:
        raise BadInput(msg("config.file.over", most=f"{most:,}"), file=str(path))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadInput(msg("config.file.cannot_read", error=str(err)), file=str(path)) from None


def read_yaml(path: str | Path) -> dict:
    """A YAML config file -> its mapping ({} for an empty file)."""
    path = Path(path)
    text = _read_config_text(path)
    try:
        raw = yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise BadInput(_yaml_error(err), file=str(path)) from None
    except BadInput as err:
        raise BadInput(err.what, file=str(path)) from None
    except RecursionError:
        raise BadInput(msg("config.yaml.too_deep"), file=str(path)) from None
    except ValueError as err:  # e.g. an integer with more digits than Python converts
        raise BadInput(msg("config.yaml.invalid", detail=_short(str(err))),
                       file=str(path)) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise BadInput(msg("config.yaml.not_mapping"), file=str(path))
    return raw


def to_dict(instance: Any) -> dict:
    return dataclasses.asdict(instance)


def to_yaml(instance: Any) -> str:
    return yaml.safe_dump(to_dict(instance), sort_keys=False, allow_unicode=True)


def changed(instance: Any) -> dict:
    """Only the settings that differ from their defaults (what a command line needs)."""
    schema = type(instance)
    return {k: v for k, v in to_dict(instance).items() if v != default_value(schema, k)}


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(value)
    return str(value)


# --- the command line: flags and --help, generated ----------------------------------

def describe(schema: type, name: str) -> str:
    """'TYPE, default X, range A to B: help' for one setting (for --help)."""
    f, kind = fields(schema)[name], types(schema)[name]
    meta = f.metadata
    type_name = {bool: "true/false", int: "integer", float: "number", str: "text",
                 list[str]: "list"}.get(kind, "true/false or a path")
    parts = [type_name, f"default {format_value(default_value(schema, name)) or '(empty)'}"]
    if meta["choices"] is not None:
        parts.append("one of " + ", ".join(map(str, meta["choices"])))
    elif meta["min"] is not None and meta["max"] is not None:
        parts.append(f"range {number(meta['min'])} to {number(meta['max'])}")
    elif meta["min"] is not None:
        parts.append(f"at least {number(meta['min'])}")
    for key, what in (("stages", "stage"), ("methods", "method"), ("tasks", "eval_task")):
        if meta.get(key):
            parts.append(f"{what} {', '.join(meta[key])} only")
    return f"{'; '.join(parts)}. {meta['help']}"


def number(x: float) -> str:
    """1e-08, 0.5, 2,147,483,647: as a person reads a bound."""
    return f"{int(x):,}" if float(x).is_integer() else f"{x:g}"


def help_text(schema: type, groups: tuple[str, ...]) -> str:
    """Every setting of `schema`, grouped as the form groups them, for `--help`."""
    import textwrap
    out = []
    for group in groups:
        out.append(f"{group} settings:")
        for f in fields_in(schema, group):
            body = textwrap.fill(describe(schema, f.name), width=96, initial_indent="      ",
                                 subsequent_indent="      ", break_on_hyphens=False,
                                 break_long_words=False)
            out.append(f"  {f.name}\n{body}")
        out.append("")
    return "\n".join(out)


def add_flags(parser, schema: type) -> None:
    """One option per setting that declares a `flag`; unset options stay None, so only
    what the user typed overrides the defaults (and a config file, where there is one)."""
    for name, f in fields(schema).items():
        if f.metadata["flag"]:
            parser.add_argument(f.metadata["flag"], dest=name, default=None,
                                metavar=name.upper(), help=describe(schema, name))


def from_flags(args, schema: type) -> dict[str, Any]:
    """The settings given as flags on the command line, as raw values for `build`."""
    return {name: getattr(args, name) for name in fields(schema)
            if getattr(args, name, None) is not None}
