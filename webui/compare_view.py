"""The Train tab's comparison of runs, and the note and tags of the run shown.

A user picks runs in `train-compare-runs`; one chart overlays a curve of each (loss, eval
loss, learning rate or a stage's signal) against steps, tokens seen or time, and a table
beside it holds their final metrics, eval results and the settings where they differ.
Everything is read from the run folders by core.compare; a `Comparison` per browser tab
re-reads only the files that changed, so the Train tab's tick keeps live runs current
at the cost of a few `stat` calls (and nothing at all when no run is picked).
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd

from core import compare, i18n, plot
from core.errors import BadInput
from core.i18n import t, text_of

from .i18n import redraw, transient, widget
from .runs_view import _thin, find_listed_run, listed_runs

# One colour per run, in the order picked (set explicitly: Gradio keeps the colours of the
# first frame it drew, so a run added later would otherwise be drawn without one).
PALETTE = ["#1d4ed8", "#e4572e", "#2da44e", "#8250df", "#bf8700", "#0891b2", "#db2777",
           "#4b5563"]
AXES = [("steps", "step"), ("tokens seen", "tokens"), ("time", "time")]
COLUMNS = ["x", "value", "run"]


def axes() -> list[tuple[str, str]]:
    """AXES, their names in the current language."""
    return [(t(f"ui.compare.axis.{value}"), value) for _, value in AXES]


def axis_name(axis: str) -> str:
    """An x axis as the chart's label and the note name it (core.compare.X_AXES)."""
    return t(f"ui.compare.axis_title.{axis}")


class Panel:
    """The per-tab comparison: picked runs, chosen curve and x axis, and what was read."""

    def __init__(self):
        self.comparison = compare.Comparison()
        self.metric = "loss"
        self.axis = "step"
        self.offered: tuple = ()


def train_run_choices(saves_dir: Path, query: str = "") -> list[str]:
    """The training runs the list shows (eval jobs are not compared), passing its filter."""
    return [run.name for run in listed_runs(saves_dir)
            if run.kind == "train" and compare.matches(run.path, query)]


class ComparePanel:
    """Builds the comparison inside the current layout; `wire` connects it to the tab."""

    def __init__(self, saves_dir: Path):
        self.saves_dir = Path(saves_dir)
        self.state = gr.State(Panel)  # a fresh Panel per browser tab
        with widget(gr.Accordion, {"label": "ui.compare.title"}, open=True,
                    elem_id="train-compare"):
            self.runs = widget(gr.Dropdown,
                               {"label": "ui.compare.runs", "info": "ui.compare.runs.info"},
                               choices=[], value=[], multiselect=True,
                               elem_id="train-compare-runs")
            with gr.Row(equal_height=False):
                self.metric = widget(gr.Radio, {"label": "ui.compare.curve", "choices": only_loss},
                                     value="loss", scale=3, elem_id="train-compare-metric")
                self.x = widget(gr.Radio, {"label": "ui.compare.x", "choices": axes},
                                value="step", scale=2, elem_id="train-compare-x")
            with gr.Row(equal_height=False):
                with gr.Column(scale=3):
                    # The axis titles stay put and the chart's label names the curve and
                    # the axis: Gradio draws a frame whose axis title changed from the
                    # previous frame's data.
                    self.plot = widget(gr.LinePlot,
                                       {"x_title": "ui.compare.x_title",
                                        "y_title": "ui.compare.y_title",
                                        "label": "plot.metric.loss",
                                        "color_title": "ui.compare.legend"},
                                       value=_frame([]), x="x", y="value", color="run",
                                       elem_id="train-compare-plot")
                    self.note = gr.Markdown(elem_id="train-compare-note")
                with gr.Column(scale=2):
                    self.table = widget(gr.Dataframe, {"label": "ui.compare.table"}, value=[],
                                        interactive=False, wrap=True, max_height=420,
                                        elem_id="train-compare-table")
        # A language switch draws the chart's label, the table and the note again.
        redraw(self.draw, [self.state], self.outputs)

    @property
    def outputs(self) -> list:
        """What drawing the comparison updates (`draw`, `tick`), in this order."""
        return [self.plot, self.metric, self.table, self.note]

    def wire(self, refresh: gr.Button, runs_filter: gr.Textbox) -> None:
        quiet = dict(show_progress="hidden", api_visibility="private")
        self.runs.input(self.on_pick, [self.state, self.runs], self.outputs, **quiet)
        self.metric.input(self.on_metric, [self.state, self.metric], self.outputs, **quiet)
        self.x.input(self.on_axis, [self.state, self.x], self.outputs, **quiet)
        # The choices follow the runs list: opening the picker, Refresh, the filter.
        gr.on([self.runs.focus, refresh.click, runs_filter.change], self.on_choices,
              [self.runs, runs_filter], [self.runs], **quiet)

    # --- handlers ------------------------------------------------------------------------

    def on_choices(self, picked: list[str] | None, query: str | None = ""):
        """The runs that can be picked now; those already picked stay."""
        picked = list(picked or [])
        found = train_run_choices(self.saves_dir, query or "")
        return gr.update(choices=found + [n for n in picked if n not in found])

    def on_pick(self, panel: Panel, names: list[str] | None) -> list:
        paths = [p for p in (find_listed_run(self.saves_dir, n) for n in names or []) if p]
        panel.comparison.select(paths)
        panel.comparison.refresh()
        return self.draw(panel, picker=True)

    def on_metric(self, panel: Panel, metric: str | None) -> list:
        panel.metric = metric or "loss"
        return self.draw(panel)

    def on_axis(self, panel: Panel, axis: str | None) -> list:
        panel.axis = axis if axis in compare.X_AXES else "step"
        return self.draw(panel)

    def tick(self, panel: Panel) -> list:
        """From the Train tab's tick: redraw only when a picked run's files changed."""
        if not panel.comparison.runs or not panel.comparison.refresh():
            return [gr.skip()] * len(self.outputs)
        return self.draw(panel)

    # --- drawing -------------------------------------------------------------------------

    def draw(self, panel: Panel, picker: bool = False) -> list:
        comparison = panel.comparison
        offered = tuple(comparison.metrics())
        if panel.metric not in [m for _, m in offered] and offered:
            panel.metric = offered[0][1]
        chooser = gr.skip()
        if picker or offered != panel.offered:
            panel.offered = offered
            chooser = gr.update(choices=list(offered) or only_loss(), value=panel.metric)
        label = dict((m, l) for l, m in offered).get(panel.metric) or metric_label(panel.metric)
        names = [run.name for run in comparison.runs.values()]
        chart = gr.update(
            value=_frame(thinned_rows(comparison, panel.metric, panel.axis)),
            color_map={name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)},
            label=t("ui.compare.by", curve=label, axis=axis_name(panel.axis)))
        columns, rows = comparison.table(self.saves_dir)
        table = pd.DataFrame(rows, columns=columns) if names else pd.DataFrame()
        return [chart, chooser, table, note_text(comparison, panel.metric, panel.axis, label)]


def note_text(comparison: compare.Comparison, metric: str, axis: str, label: str) -> str:
    """What the chart does not show and why, in a line."""
    if not comparison.runs:
        return t("ui.compare.note.empty")
    parts = []
    if len(comparison.runs) == 1:
        parts.append(t("ui.compare.note.one"))
    missing = comparison.missing(metric, axis)
    if missing:
        runs = t("list.sep").join(missing)
        parts.append(t("ui.compare.note.missing", curve=label, runs=runs) if axis == "step"
                     else t("ui.compare.note.missing_on", curve=label, axis=axis_name(axis),
                            runs=runs))
    broken = [run.name for run in comparison.runs.values() if run.settings_error]
    if broken:
        parts.append(t("ui.compare.note.broken", runs=t("list.sep").join(broken)))
    return " ".join(f"*{p}*" for p in parts)


def thinned_rows(comparison: compare.Comparison, metric: str, axis: str) -> list[tuple]:
    """The chart's (x, value, run) rows, each run's curve thinned as the loss chart's is
    (runs_view.MAX_POINTS), so a long live run stays light to send every tick."""
    rows = []
    for run in comparison.runs.values():
        xs, ys = _thin(*run.curve(metric, axis))
        rows += [(x, y, run.name) for x, y in zip(xs, ys)]
    return rows


def metric_label(metric: str) -> str:
    """A curve's name before any run logged it: loss, eval loss, a stage's signal."""
    key = f"plot.metric.{metric}"
    return t(key) if i18n.has(key) else plot.signal_short(metric)


def only_loss() -> list[tuple[str, str]]:
    """The curve picker before any run is picked."""
    return [(t("plot.metric.loss"), "loss")]


def _frame(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=COLUMNS)


# --- the note and tags of the run shown -----------------------------------------------------

class NotesPanel:
    """A note and tags for the run shown in the Train tab, kept in its folder (notes.json)."""

    def __init__(self, saves_dir: Path):
        self.saves_dir = Path(saves_dir)
        with gr.Row(equal_height=False):
            self.note = widget(gr.Textbox, {"label": "ui.compare.notes.note"}, lines=1,
                               max_lines=6, scale=3, elem_id="train-run-note")
            self.tags = widget(gr.Textbox,
                               {"label": "ui.compare.notes.tags",
                                "info": "ui.compare.notes.tags.info"},
                               max_lines=1, scale=2, elem_id="train-run-tags")
            self.save = widget(gr.Button, {"value": "ui.compare.notes.save"}, size="sm", scale=1,
                               elem_id="train-run-note-save")
        self.message = gr.Markdown(elem_id="train-run-note-msg")
        transient(self.message)

    def on_show(self, run_name: str | None) -> list:
        """The run shown changed: its note and tags."""
        path = find_listed_run(self.saves_dir, run_name) if run_name else None
        notes = compare.read_notes(path) if path else {"note": "", "tags": []}
        return [notes["note"], ", ".join(notes["tags"]), ""]

    def on_save(self, run_name: str | None, note: str, tags: str) -> str:
        path = find_listed_run(self.saves_dir, run_name) if run_name else None
        if path is None:
            return t("ui.compare.notes.no_run")
        try:
            saved = compare.write_notes(path, note, tags)
        except BadInput as err:
            return t("ui.compare.notes.not_saved", error=text_of(err))
        tags = ", ".join(saved["tags"]) or t("ui.compare.notes.no_tags")
        return t("ui.compare.notes.saved", run=path.name, tags=tags)
