"""The training form, generated from `core.config.FIELDS`.

Nothing here names a setting: each widget is derived from its field's type and
metadata (choices -> dropdown, bool -> checkbox, number -> number box, help ->
info text, advanced -> folded away, methods -> shown only for those methods).
The only per-field table is `SPEC_IDS`, the element ids that shared/SPEC.md
fixes for automation; every other field gets "train-<key>".

Values travel as a plain mapping of raw widget values; `core.config.from_mapping`
coerces and validates them exactly as it does for YAML and the CLI.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

import gradio as gr

from core import config as cfg

SPEC_IDS = {
    "model": "train-model", "dataset": "train-dataset", "method": "train-method",
    "epochs": "train-epochs", "learning_rate": "train-lr", "output_dir": "train-output",
    "identity_name": "identity-name", "identity_author": "identity-author",
}
# Words that read better spelled out or capitalised in a label.
_WORDS = {"lora": "LoRA", "lr": "LR", "len": "length", "accum": "accumulation",
          "val": "validation", "grad": "gradient", "num": "number of", "rope": "RoPE",
          "optim": "optimizer"}
PER_ROW = 4   # widgets per row; more get cramped in the form's column
_TYPES = typing.get_type_hints(cfg.TrainConfig)


def elem_id(name: str) -> str:
    return SPEC_IDS.get(name, "train-" + name.replace("_", "-"))


def label(name: str) -> str:
    words = [_WORDS.get(w, w) for w in name.split("_")]
    text = " ".join(words)
    return text[0].upper() + text[1:]


def info(f: dataclasses.Field) -> str:
    """The help text, plus the allowed range so nobody has to guess it."""
    meta, text = f.metadata, f.metadata["help"]
    lo, hi = meta["min"], meta["max"]
    if lo is not None and hi is not None:
        text += f" Range {_num(lo)} to {_num(hi)}."
    elif lo is not None:
        text += f" At least {_num(lo)}."
    return text


def _num(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:g}"


def widget_value(name: str, value: Any) -> Any:
    """A config value as its widget shows it."""
    if _TYPES[name] == (bool | str):
        return cfg.format_value(value)  # resume: "false", "true" or a checkpoint path
    return value


def _number_step(f: dataclasses.Field) -> float:
    if _TYPES[f.name] is int:
        return 1
    default = cfg.default_value(f.name)
    if default and default > 0:
        return 10 ** math.floor(math.log10(default))  # 2e-4 -> 1e-4, 3.0 -> 1
    return 0.01


def make_widget(f: dataclasses.Field, value: Any, dataset_choices: list[str]) -> gr.Component:
    """One widget for one field, chosen from its type and metadata."""
    meta, kind = f.metadata, _TYPES[f.name]
    common = dict(label=label(f.name), info=info(f), elem_id=elem_id(f.name),
                  visible=meta["methods"] is None or cfg.default_value("method") in meta["methods"])
    value = widget_value(f.name, value)
    if kind == list[str]:
        # Registered names, plus any file path typed in (allow_custom_value).
        return gr.Dropdown(choices=sorted(set(dataset_choices) | set(value)), value=value,
                           multiselect=True, allow_custom_value=True, scale=2, **common)
    if meta["choices"] is not None:
        return gr.Dropdown(choices=list(meta["choices"]), value=value, **common)
    if kind is bool:
        return gr.Checkbox(value=value, **common)
    if kind in (int, float):
        if meta["widget"] == "slider":
            return gr.Slider(meta["min"], meta["max"], value=value, step=_number_step(f), **common)
        # No minimum/maximum on the widget: out-of-range values reach from_mapping,
        # which names the field and the range in the same words as the CLI.
        return gr.Number(value=value, step=_number_step(f), **common)
    # The browser stops typing at the documented maximum; the server checks it regardless.
    return gr.Textbox(value=value, max_lines=1, scale=2 if f.name == "model" else 1,
                      max_length=meta["max_len"], **common)


@dataclasses.dataclass
class Form:
    """The widgets of the form, keyed by config field name, in schema order."""
    widgets: dict[str, gr.Component]

    @property
    def names(self) -> list[str]:
        return list(self.widgets)

    @property
    def components(self) -> list[gr.Component]:
        return list(self.widgets.values())

    @property
    def method_limited(self) -> list[str]:
        return [n for n in self.widgets if cfg.FIELDS[n].metadata["methods"] is not None]


def build_form(config: cfg.TrainConfig, dataset_choices: list[str]) -> Form:
    """Lay the widgets out: one row per group, advanced settings in a folded accordion."""
    values = cfg.to_dict(config)
    widgets: dict[str, gr.Component] = {}
    def rows(fields: list[dataclasses.Field]) -> None:
        # Method-specific settings share their own row, so hiding some leaves no holes.
        general = [f for f in fields if f.metadata["methods"] is None]
        specific = [f for f in fields if f.metadata["methods"] is not None]
        n_rows = max(1, math.ceil(len(general) / PER_ROW))
        cuts = [math.ceil(i * len(general) / n_rows) for i in range(n_rows + 1)]
        for chunk in [general[a:b] for a, b in zip(cuts, cuts[1:])] + [specific]:
            if chunk:  # split evenly: 5 fields make rows of 3 and 2, not 4 and 1
                with gr.Row(equal_height=False):
                    for f in chunk:
                        widgets[f.name] = make_widget(f, values[f.name], dataset_choices)

    for group in cfg.GROUPS:
        rows([f for f in cfg.fields_in(group) if not f.metadata["advanced"]])
    with gr.Accordion("Advanced settings", open=False, elem_id="train-advanced"):
        for group in cfg.GROUPS:
            rows([f for f in cfg.fields_in(group) if f.metadata["advanced"]])
    # Keep schema order so positional handler arguments line up with cfg.FIELDS.
    return Form({name: widgets[name] for name in cfg.FIELDS})


def to_mapping(names: list[str], values: list[Any]) -> dict:
    """Raw widget values -> the mapping `core.config.from_mapping` reads."""
    raw = dict(zip(names, values))
    for name, value in raw.items():
        if _TYPES[name] == (bool | str) and (value is None or str(value).strip() == ""):
            raw[name] = False  # an empty resume box means "do not resume"
    return raw


def to_config(names: list[str], values: list[Any]) -> cfg.TrainConfig:
    """Widget values -> a validated config; raises BadInput/Problems listing every problem."""
    return cfg.from_mapping(to_mapping(names, values), source="the form")


def values_of(config: cfg.TrainConfig, names: list[str]) -> list[Any]:
    """A config as widget values, in the order of `names` (for loading into the form)."""
    data = cfg.to_dict(config)
    return [widget_value(n, data[n]) for n in names]


def visibility(method: str, names: list[str]) -> list[dict]:
    """gr.update(visible=...) for each method-limited widget, for the chosen method."""
    return [gr.update(visible=method in cfg.FIELDS[n].metadata["methods"]) for n in names]
