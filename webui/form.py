"""The training form, generated from `core.config.FIELDS`.

Nothing here names a setting: each widget is derived from its field's type and
metadata (choices -> dropdown, bool -> checkbox, number -> number box, help ->
info text, advanced -> folded away, methods/stages -> shown only for those tuning
methods and training stages).
The only per-field table is `SPEC_IDS`, the element ids that shared/SPEC.md
fixes for automation; every other field gets "train-<key>".

Values travel as a plain mapping of raw widget values; `core.config.from_mapping`
coerces and validates them exactly as it does for YAML and the CLI.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import gradio as gr

from core import config as cfg
from core import schema
from core.i18n import t

from .i18n import tr, widget

SPEC_IDS = {
    "model": "train-model", "dataset": "train-dataset", "method": "train-method",
    "epochs": "train-epochs", "learning_rate": "train-lr", "output_dir": "train-output",
    "identity_name": "identity-name", "identity_author": "identity-author",
}
PER_ROW = 4   # widgets per row; more get cramped in the form's column


def elem_id(name: str, prefix: str = "train") -> str:
    if prefix == "train" and name in SPEC_IDS:
        return SPEC_IDS[name]
    return f"{prefix}-" + name.replace("_", "-")


def short_name(settings: type) -> str:
    """The schema's name in the catalogue's ids (core.config.SCHEMAS)."""
    return next(short for short, s in cfg.SCHEMAS.items() if s is settings)


def label(name: str, settings: type = cfg.TrainConfig) -> str:
    return t(f"field.{short_name(settings)}.{name}.label")


def info(f: dataclasses.Field, settings: type = cfg.TrainConfig) -> str:
    """The help text, plus the allowed range so nobody has to guess it."""
    meta, text = f.metadata, t(f"field.{short_name(settings)}.{f.name}.help")
    lo, hi = meta["min"], meta["max"]
    if lo is not None and hi is not None:
        text += t("form.range", lo=schema.number(lo), hi=schema.number(hi))
    elif lo is not None:
        text += t("form.at_least", lo=schema.number(lo))
    return text


def field_texts(settings: type, names: list[str]) -> dict[str, dict[str, str]]:
    """{name: {"label", "info"}} of a schema's widgets in the current language: what a
    language switch updates (webui/i18n.py)."""
    fields = schema.fields(settings)
    return {n: {"label": label(n, settings), "info": info(fields[n], settings)} for n in names}


def widget_value(name: str, value: Any, settings: type = cfg.TrainConfig) -> Any:
    """A config value as its widget shows it."""
    if schema.types(settings)[name] == (bool | str):
        return cfg.format_value(value)  # resume: "false", "true" or a checkpoint path
    return value


def _number_step(f: dataclasses.Field, settings: type = cfg.TrainConfig) -> float:
    if schema.types(settings)[f.name] is int:
        return 1
    default = schema.default_value(settings, f.name)
    if default and default > 0:
        return 10 ** math.floor(math.log10(default))  # 2e-4 -> 1e-4, 3.0 -> 1
    return 0.01


def limited(f: dataclasses.Field) -> bool:
    """A setting that only some tuning methods or training stages take."""
    return f.metadata.get("methods") is not None or f.metadata.get("stages") is not None


def shown(f: dataclasses.Field, method: str, stage: str) -> bool:
    """Whether the form shows a setting for this method and stage: each restriction it
    declares (`methods=`, `stages=` in the schema) must admit them."""
    methods, stages = f.metadata.get("methods"), f.metadata.get("stages")
    return (methods is None or method in methods) and (stages is None or stage in stages)


def make_widget(f: dataclasses.Field, value: Any, dataset_choices: list[str],
                settings: type = cfg.TrainConfig, prefix: str = "train",
                visible: bool = True) -> gr.Component:
    """One widget for one field of `settings` (a schema), chosen from its type and metadata;
    its label and help follow the page's language (webui/i18n.py)."""
    widget = _widget(f, value, dataset_choices, settings, prefix, visible)
    return tr(widget, label=lambda: label(f.name, settings), info=lambda: info(f, settings))


def _widget(f: dataclasses.Field, value: Any, dataset_choices: list[str], settings: type,
            prefix: str, visible: bool) -> gr.Component:
    meta, kind = f.metadata, schema.types(settings)[f.name]
    common = dict(label=label(f.name, settings), info=info(f, settings),
                  elem_id=elem_id(f.name, prefix),
                  visible=visible)
    value = widget_value(f.name, value, settings)
    if kind == list[str]:
        # A list of paths (the datasets) offers the registered names, another list what its
        # field suggests (metadata "suggest", when the schema gives one); anything typed
        # is taken too (allow_custom_value), and checked by the schema.
        offered = dataset_choices if meta["path"] else list(meta.get("suggest") or ())
        return gr.Dropdown(choices=sorted(set(offered) | set(value)), value=value,
                           multiselect=True, allow_custom_value=True, scale=2, **common)
    if meta["choices"] is not None:
        return gr.Dropdown(choices=list(meta["choices"]), value=value, **common)
    if kind is bool:
        return gr.Checkbox(value=value, **common)
    if kind in (int, float):
        if meta["widget"] == "slider":
            return gr.Slider(meta["min"], meta["max"], value=value,
                             step=_number_step(f, settings), **common)
        # No minimum/maximum on the widget: out-of-range values reach from_mapping,
        # which names the field and the range in the same words as the CLI.
        return gr.Number(value=value, step=_number_step(f, settings),
                         precision=0 if kind is int else None, **common)
    # The browser stops typing at the documented maximum; the server checks it regardless.
    if meta.get("multiline"):
        return gr.Textbox(value=value, lines=2, max_length=meta["max_len"], **common)
    return gr.Textbox(value=value, max_lines=1, scale=2 if f.name == "model" else 1,
                      max_length=meta["max_len"], **common)


@dataclasses.dataclass
class Form:
    """The widgets of the form, keyed by config field name, in schema order, and the rows
    that hold only method- or stage-specific settings (hidden when none of theirs show)."""
    widgets: dict[str, gr.Component]
    limited_rows: list[tuple[gr.Row, list[str]]] = dataclasses.field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return list(self.widgets)

    @property
    def components(self) -> list[gr.Component]:
        return list(self.widgets.values())

    @property
    def limited(self) -> list[str]:
        """The settings shown only for some methods or stages (what `visibility` updates)."""
        return [n for n in self.widgets if limited(cfg.FIELDS[n])]

    @property
    def method_limited(self) -> list[str]:
        return [n for n in self.widgets if cfg.FIELDS[n].metadata["methods"] is not None]


def even_rows(fields: list) -> list[list]:
    """Fields split evenly into rows of at most PER_ROW: 5 make rows of 3 and 2, not 4 and 1."""
    n_rows = max(1, math.ceil(len(fields) / PER_ROW))
    cuts = [math.ceil(i * len(fields) / n_rows) for i in range(n_rows + 1)]
    return [fields[a:b] for a, b in zip(cuts, cuts[1:]) if fields[a:b]]


def build_form(config: cfg.TrainConfig, dataset_choices: list[str]) -> Form:
    """Lay the widgets out: one row per group, advanced settings in a folded accordion.
    Settings for other methods or stages than the config's start hidden."""
    values = cfg.to_dict(config)
    widgets: dict[str, gr.Component] = {}
    limited_rows: list[tuple[gr.Row, list[str]]] = []

    def rows(fields: list[dataclasses.Field]) -> None:
        # Method- and stage-specific settings get rows of their own, so hiding some leaves
        # no holes among the general ones, and a row with none showing is hidden too.
        general = [f for f in fields if not limited(f)]
        by_method = [f for f in fields if f.metadata["methods"] is not None]
        by_stage = [f for f in fields if limited(f) and f not in by_method]
        for chunk in even_rows(general) + even_rows(by_method) + even_rows(by_stage):
            visible = [shown(f, config.method, config.stage) for f in chunk]
            specific = limited(chunk[0])
            with gr.Row(equal_height=False, visible=any(visible) or not specific) as row:
                for f, show in zip(chunk, visible):
                    widgets[f.name] = make_widget(f, values[f.name], dataset_choices,
                                                  visible=show)
            if specific:
                limited_rows.append((row, [f.name for f in chunk]))

    for group in cfg.GROUPS:
        rows([f for f in cfg.fields_in(group) if not f.metadata["advanced"]])
    with widget(gr.Accordion, {"label": "ui.train.advanced"}, open=False,
                elem_id="train-advanced"):
        for group in cfg.GROUPS:
            rows([f for f in cfg.fields_in(group) if f.metadata["advanced"]])
    # Keep schema order so positional handler arguments line up with cfg.FIELDS.
    return Form({name: widgets[name] for name in cfg.FIELDS}, limited_rows)


def build_settings(settings: type, instance: Any, prefix: str, per_row: int = PER_ROW) -> Form:
    """The widgets of a small schema (generation, export), in rows, ids `<prefix>-<key>`."""
    values, widgets = schema.to_dict(instance), {}
    names = list(schema.fields(settings))
    for start in range(0, len(names), per_row):
        with gr.Row(equal_height=False):
            for name in names[start:start + per_row]:
                widgets[name] = make_widget(schema.fields(settings)[name], values[name], [],
                                            settings, prefix)
    return Form(widgets)


def settings_of(settings: type, names: list[str], values: list[Any], source: str) -> Any:
    """Widget values of a small schema -> its validated instance (BadInput names fields)."""
    rules = {cfg.ExportConfig: cfg.export_config, cfg.GenConfig: cfg.gen_config}[settings]
    return rules(dict(zip(names, values)), source)


def to_mapping(names: list[str], values: list[Any]) -> dict:
    """Raw widget values -> the mapping `core.config.from_mapping` reads."""
    raw = dict(zip(names, values))
    for name, value in raw.items():
        if schema.types(cfg.TrainConfig)[name] == (bool | str) and (
                value is None or str(value).strip() == ""):
            raw[name] = False  # an empty resume box means "do not resume"
    return raw


def to_config(names: list[str], values: list[Any]) -> cfg.TrainConfig:
    """Widget values -> a validated config; raises BadInput/Problems listing every problem."""
    return cfg.from_mapping(to_mapping(names, values), source="the form")


def values_of(config: cfg.TrainConfig, names: list[str]) -> list[Any]:
    """A config as widget values, in the order of `names` (for loading into the form)."""
    data = cfg.to_dict(config)
    return [widget_value(n, data[n]) for n in names]


def visibility(method: str, names: list[str], stage: str | None = None) -> list[dict]:
    """gr.update(visible=...) for each widget of `names`, for the chosen method and stage
    (the default stage when none is given)."""
    stage = stage or cfg.default_value("stage")
    return [gr.update(visible=shown(cfg.FIELDS[n], method, stage)) for n in names]


def row_visibility(form: Form, method: str, stage: str) -> list[dict]:
    """gr.update(visible=...) for each of the form's method- or stage-specific rows: shown
    when any of its settings is."""
    return [gr.update(visible=any(shown(cfg.FIELDS[n], method, stage) for n in names))
            for _, names in form.limited_rows]
