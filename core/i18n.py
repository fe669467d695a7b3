"""Every text a person reads, in each language, from one catalogue per language.

`core/locales/<lang>.yaml` maps stable ids ("train.start", "data.missing_field") to text
with `{named}` fields (str.format). English is the reference: each other language holds
every English id (tests/test_i18n.py fails otherwise), except a language whose file
declares a narrower `_scope` (the id prefixes it covers), which shows English outside it.
Adding a language is adding one file.

The settings' labels and help are keyed here too, as `field.<schema>.<name>.label` and
`.help`. Their English is declared once, in the schema (core/config.py); this module
reads it from there, so a setting is still described in one place.

Which language: an explicit `lang=`; else the resolver the web page installs (each
visitor's choice); else TUNEBENCH_LANG; else the locale (LC_ALL, LC_MESSAGES, LANG);
else English. The CLI therefore stays English unless the environment asks otherwise.

A `Msg` is a message not yet rendered: an id and its parameters. Errors carry one, so
status.json can keep the id and parameters beside the English text, and the page can show
an ended run's error in whichever language its visitor reads.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, Callable

import yaml

LOCALES = Path(__file__).parent / "locales"
ENGLISH = "en"
ENV = "TUNEBENCH_LANG"
META = ("_name", "_scope")   # per-file settings, not messages

_resolver: Callable[[], str | None] | None = None
# A language fixed for one block of code (`speaking`), before the resolver: a context
# variable, so each thread and each page event keeps its own.
_speaking: contextvars.ContextVar[str | None] = contextvars.ContextVar("speaking", default=None)


# --- the catalogues -------------------------------------------------------------------

@functools.cache
def _file(lang: str) -> dict[str, Any]:
    path = LOCALES / f"{lang}.yaml"
    found = yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else {}
    return found or {}


@functools.cache  # asked by every t() that resolves a language: read the folder once
def languages() -> dict[str, str]:
    """{code: its own name} for each catalogue present, English first."""
    codes = sorted(p.stem for p in LOCALES.glob("*.yaml"))
    codes.sort(key=lambda c: c != ENGLISH)
    return {c: _file(c).get("_name", c) for c in codes}


def scope(lang: str) -> tuple[str, ...] | None:
    """The id prefixes a partial language covers; None for a complete one."""
    found = _file(lang).get("_scope")
    return tuple(found) if found else None


@functools.cache
def catalogue(lang: str) -> dict[str, str]:
    """The messages of one language (English includes the settings' schema text)."""
    found = {k: str(v) for k, v in _file(lang).items() if k not in META}
    if lang == ENGLISH:
        found = {**schema_texts(), **found}
    return found


def schema_texts() -> dict[str, str]:
    """`field.<schema>.<name>.label/.help` in English, read from the schemas."""
    from . import config as cfg, schema   # late: config imports this module's users
    texts = {}
    for short, settings in cfg.SCHEMAS.items():
        for name, f in schema.fields(settings).items():
            texts[f"field.{short}.{name}.label"] = f.metadata.get("label") or default_label(name)
            texts[f"field.{short}.{name}.help"] = f.metadata["help"]
    return texts


# Words that read better spelled out or capitalised in an English label.
_WORDS = {"lora": "LoRA", "lr": "LR", "len": "length", "accum": "accumulation",
          "val": "validation", "grad": "gradient", "num": "number of", "rope": "RoPE",
          "optim": "optimizer", "rslora": "rsLoRA", "loraplus": "LoRA+", "oft": "OFT",
          "init": "initialisation"}


def default_label(name: str) -> str:
    """A setting's English label from its key: lora_rank -> "LoRA rank"."""
    text = " ".join(_WORDS.get(w, w) for w in name.split("_"))
    return text[0].upper() + text[1:]


# --- which language -------------------------------------------------------------------

def set_resolver(resolver: Callable[[], str | None] | None) -> None:
    """Install the web page's "which language does this visitor read" (None: unset)."""
    global _resolver
    _resolver = resolver


def supported(tag: str | None) -> str | None:
    """A language tag ("zh-CN", "zh_CN.UTF-8", "ja") -> a catalogue's code, or None."""
    if not tag:
        return None
    code = tag.strip().replace("_", "-").split(".")[0].split("-")[0].lower()
    return code if code in languages() else None


def environment_lang() -> str:
    """TUNEBENCH_LANG, else the locale, else English: what the CLI and workers speak."""
    for name in (ENV, "LC_ALL", "LC_MESSAGES", "LANG"):
        if os.environ.get(name):
            return supported(os.environ[name]) or ENGLISH
    return ENGLISH


@contextlib.contextmanager
def speaking(lang: str):
    """Render every text inside the block in `lang`, whoever the resolver says reads it."""
    token = _speaking.set(lang)
    try:
        yield
    finally:
        _speaking.reset(token)


def current() -> str:
    forced = _speaking.get()
    if forced:
        return forced
    if _resolver is not None:
        found = _resolver()
        if found:
            return found
    return environment_lang()


# --- rendering ------------------------------------------------------------------------

def has(key: str, lang: str = ENGLISH) -> bool:
    return key in catalogue(lang)


def t(key: str, lang: str | None = None, /, **params: Any) -> str:
    """The text of `key` in `lang` (default: current()), its fields filled from `params`.

    A parameter that is itself a Msg (or a list of them) is rendered in the same language.
    A language without the id shows the English; an id unknown everywhere shows the id, so
    a missing text is visible on the page instead of failing the request."""
    lang = lang or current()
    template = catalogue(lang).get(key)
    if template is None:
        template = catalogue(ENGLISH).get(key, key)
    if not params:
        return template
    shown = {k: render(v, lang) for k, v in params.items()}
    try:
        return template.format(**shown)
    except (KeyError, IndexError, ValueError):
        return catalogue(ENGLISH).get(key, key).format_map(_Missing(shown))


class _Missing(dict):
    def __missing__(self, key):
        return "{" + key + "}"


class Bullets(list):
    """A list parameter shown one item per line ("\n  - item"), as Problems lists them."""


def render(value: Any, lang: str | None = None) -> Any:
    """Msgs inside a parameter -> their text; anything else unchanged."""
    if isinstance(value, Msg):
        return value.text(lang)
    if isinstance(value, Bullets):
        return "".join("\n  - " + str(render(v, lang)) for v in value)
    if isinstance(value, (list, tuple)) and any(isinstance(v, Msg) for v in value):
        return t("list.sep", lang).join(str(render(v, lang)) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class Msg:
    """A message by id and parameters, rendered when shown (in the reader's language)."""
    key: str
    params: dict = dataclasses.field(default_factory=dict)

    def text(self, lang: str | None = None) -> str:
        return t(self.key, lang, **self.params)

    def __str__(self) -> str:
        return self.text()

    def record(self) -> dict:
        """A language-neutral JSON form (status.json): the id and its parameters."""
        return {"code": self.key, "params": {k: _record(v) for k, v in self.params.items()}}

    @classmethod
    def from_record(cls, found: dict) -> "Msg":
        return cls(found["code"], {k: _unrecord(v) for k, v in found.get("params", {}).items()})


def msg(key: str, /, **params: Any) -> Msg:
    return Msg(key, params)


def _record(value: Any) -> Any:
    if isinstance(value, Msg):
        return {"$msg": value.record()}
    if isinstance(value, Bullets):
        return {"$bullets": [_record(v) for v in value]}
    if isinstance(value, (list, tuple)):
        return [_record(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _unrecord(value: Any) -> Any:
    if isinstance(value, dict) and "$msg" in value:
        return Msg.from_record(value["$msg"])
    if isinstance(value, dict) and "$bullets" in value:
        return Bullets(_unrecord(v) for v in value["$bullets"])
    if isinstance(value, list):
        return [_unrecord(v) for v in value]
    return value


def text_of(value: Any, lang: str | None = None) -> str:
    """A str or a Msg (or an error carrying one) as text in `lang`."""
    if hasattr(value, "text") and callable(value.text):
        return value.text(lang)
    return str(value)


def recorded_msg(found: dict | None, key: str) -> "str | Msg | None":
    """A text a job or worker wrote for people (`key`, English), as the Msg of the record
    written beside it (`<key>_msg`) when there is a readable one, else as written."""
    record = (found or {}).get(f"{key}_msg")
    if record:
        try:
            return Msg.from_record(record)
        except (KeyError, TypeError, AttributeError):
            pass  # a record from another version: its English text follows
    return (found or {}).get(key)


def recorded(found: dict | None, key: str, lang: str | None = None) -> str | None:
    """That text as its reader reads it (in `lang`, default the current language)."""
    value = recorded_msg(found, key)
    return value.text(lang) if isinstance(value, Msg) else value
