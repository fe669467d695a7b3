"""The Train tab: the generated form, Start/Abort/Resume, and the live view of a run.

The tab is a front end to `tunebench train`: Start validates the form, writes a
run directory and launches the CLI in the background (core.launch); from then
on everything shown is read back from run directories. Per-browser state (which
run this tab watches, its read offsets) lives in a `gr.State`; nothing about a
run is kept in the server.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

import gradio as gr

from core import config as cfg
from core import data, job_queue, launch, limits, memory, paths, plot, runs, stage_data
from core.errors import BadInput
from core.i18n import msg, t, text_of

from . import compare_view, configs, data_worker, eval_tab, form as form_mod
from .i18n import redraw, transient, widget
from .runs_view import (COLORS, SIGNAL_COLORS, Watch, find_listed_run, legend_html, log_html,
                        loss_frame, message_html, newest_running, progress_html, run_names,
                        runs_table, series_to_show, signal_frame, status_html)

TICK_S = 1.0
TABLE_REFRESH_S = 15.0       # the running run's row (steps, loss) in the runs list
RUN_COLUMNS = ["run", "state", "steps", "final loss", "stage", "started"]
# The preview's marks: trained tokens, and for two-reply stages which reply they belong to.
PREVIEW_COLORS = {"trained": "#3fb950", "chosen (trained)": "#3fb950",
                  "rejected (trained)": "#f85149", "good reply (trained)": "#3fb950",
                  "bad reply (trained)": "#f85149", "reference answer": "#d4a72c"}
# The marks are the data worker's names; the legend shows them in the reader's language.
MARK_IDS = {"trained": "ui.train.mark.trained", "chosen (trained)": "ui.train.mark.chosen",
            "rejected (trained)": "ui.train.mark.rejected",
            "good reply (trained)": "ui.train.mark.good",
            "bad reply (trained)": "ui.train.mark.bad", "reference answer": "ui.train.mark.reference"}
SIGNAL_PANELS = 6            # stage signals drawn at once, one panel each
PANELS_PER_ROW = 3


@dataclasses.dataclass
class Session:
    """What one browser tab is looking at. Lives in gr.State, never in the server."""
    watch: Watch | None = None
    known_runs: list = dataclasses.field(default_factory=list)
    table_at: float = 0.0
    weight: float = 0.9          # smoothing of the loss chart and the signal panels
    series: list | None = None   # the signals ticked; None = the run's stage's headline ones
    offered: tuple = ()          # the signals the picker lists now
    # A refusal or note shown in the status line stays until the user acts again: a tick
    # that reads the watched run's new status must not wipe the answer to a click.
    holding_message: bool = False
    message: tuple | None = None  # (what, kind) held: a language switch shows it anew
    runs_filter: str = ""        # the runs list's filter (core.compare.matches)


# Registered datasets per stage, for the registry file as it was when asked:
# {(folder, signature of dataset_info.json): {stage: [names]}}.
_by_stage: dict[tuple, dict[str, list[str]]] = {}


def dataset_choices(dataset_dir: str, stage: str | None = None) -> list[str]:
    """Registered datasets: with a stage, only those whose kind that stage trains on
    (asked of the data worker once per version of the registry)."""
    try:
        if stage is None:
            return data.list_datasets(dataset_dir)
        folder = data.data_dir(dataset_dir or "data")
        key = (str(folder), runs.file_signature(folder / data.REGISTRY))
        if key not in _by_stage:
            found = data_worker.stage_datasets(dataset_dir or "data")
            _by_stage.clear()  # one registry version is enough to keep
            _by_stage[key] = found
        return list(_by_stage[key].get(stage, []))
    except BadInput:
        return []  # a broken registry is reported when a run or preview reads it


def fit_datasets(stage: str, dataset_dir: str, current: list[str] | None
                 ) -> tuple[list[str], list[str], str]:
    """(choices, selection, note) for the dataset picker under `stage`.

    A registered dataset of another kind leaves the selection; when none is left the
    first that fits takes its place, and the note says so. A file path stays: it is read
    for the stage when Start or Preview checks it, which says why when it does not fit.
    """
    dataset_dir = dataset_dir or "data"
    fits = dataset_choices(dataset_dir, stage)
    registered = set(dataset_choices(dataset_dir))
    current = [str(d) for d in current or []]
    keep = [d for d in current if d in fits or d not in registered]
    dropped = [d for d in current if d not in keep]
    if not dropped:
        return sorted(set(fits) | set(current)), current, ""
    what = stage_data.trains_on(stage).text()
    sep = t("list.sep")
    if not keep and not fits:
        return (sorted(set(current)), current,
                t("ui.train.dataset.none_fit", what=what, dropped=sep.join(dropped)))
    if not keep:
        keep = [fits[0]]
    return (sorted(set(fits) | set(keep)), keep,
            t("ui.train.dataset.replaced", what=what, dropped=sep.join(dropped),
              kept=sep.join(keep)))


def memory_text(config: cfg.TrainConfig) -> str:
    """The memory estimate shown before Start (core.memory reads config.json, no torch)."""
    try:
        return t("ui.train.memory", text=text_of(memory.describe(config)))
    except (BadInput, OSError, ValueError) as err:
        return t("ui.train.memory.unavailable", error=text_of(err))


def command_text(config: cfg.TrainConfig, saves_dir: Path) -> str:
    """A shell snippet that does exactly what Start does: write config.yaml, run the CLI."""
    try:
        run_dir = runs.pick_run_dir(config, saves_dir)  # the folder Start would pick now
    except BadInput as err:
        return t("ui.train.command.refused", error=text_of(err))
    config = dataclasses.replace(config, output_dir=str(run_dir), run_name=run_dir.name)
    path = shlex.quote(str(run_dir / runs.CONFIG))
    return (f"mkdir -p {shlex.quote(str(run_dir))}\n"
            f"cat > {path} <<'EOF'\n{cfg.to_yaml(config)}EOF\n"
            f"tunebench train {path}\n")


class TrainTab:
    """Builds the tab inside the current gr.Tab and wires its events."""

    def __init__(self, saves_dir: Path, dataset_dir: str = "data"):
        self.saves_dir = Path(saves_dir)
        defaults = cfg.first_job()
        self.session = gr.State(_new_session)  # a fresh Session per browser tab
        with gr.Row(equal_height=False):
            with gr.Column(scale=7):
                self.form = form_mod.build_form(
                    defaults, dataset_choices(dataset_dir, defaults.stage))
                self.dataset_note = gr.Markdown(elem_id="train-dataset-note")  # t() at each change
                rec = recommended_of(defaults)
                self.rec_state = gr.State(rec)  # what the model recommended, per browser tab
                self.recommended = gr.Markdown(recommended_text(defaults, rec),
                                               elem_id="train-recommended")
                self._data_panel()
            with gr.Column(scale=4):
                self._config_panel(defaults)
        self._controls()
        self._monitor()
        self._wire()

    # --- layout --------------------------------------------------------------------------

    def _controls(self):
        with gr.Row():
            self.start = _button("ui.train.start", variant="primary", elem_id="train-start")
            self.abort = _button("ui.train.abort", variant="stop", elem_id="train-abort")
            self.resume = _button("ui.train.resume", elem_id="train-resume")
            # A queued run shown above (core/job_queue.py): leave the queue, or go first.
            self.queue_cancel = _button("ui.train.queue_cancel", size="sm",
                                        elem_id="train-queue-cancel")
            self.queue_up = _button("ui.train.queue_up", size="sm", elem_id="train-queue-up")

    def _data_panel(self):
        with widget(gr.Accordion, {"label": "ui.train.data"}, open=False, elem_id="train-data"):
            with gr.Row():
                self.upload_name = widget(gr.Textbox,
                                          {"label": "ui.train.upload_name",
                                           "info": "ui.train.upload_name.info"},
                                          max_lines=1, elem_id="train-upload-name")
                self.upload = widget(gr.File, {"label": "ui.train.upload"},
                                     file_types=list(data.EXTENSIONS), elem_id="train-upload",
                                     scale=2, height=150)
            self.upload_status = gr.Markdown(elem_id="train-upload-status")
            self.preview_btn = _button("ui.train.preview", elem_id="train-preview-btn")
            self.preview_summary = gr.Markdown(elem_id="train-preview-summary")
            self.preview_text = widget(gr.HighlightedText, {"label": "ui.train.preview.label"},
                                       color_map=PREVIEW_COLORS, show_legend=True,
                                       combine_adjacent=True, elem_id="train-preview")

    def _monitor(self):
        bare = dict(apply_default_css=False, js_on_load=None)
        with gr.Column(elem_classes="tb-tight"):
            self.status = gr.HTML(status_html(None, None), elem_id="train-status", **bare)
            self.progress = gr.HTML(progress_html(None, []), elem_id="train-progress", **bare)
        # The eval jobs of the run shown (core.evaluate.jobs_of_run); app.py wires picking
        # one to open it in the Evaluate tab.
        self.evals = widget(gr.Radio, {"label": "ui.train.evals"}, choices=[], value=None,
                            visible=False, elem_id="train-evals")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                self.plot = widget(gr.LinePlot,
                                   {"label": "ui.train.plot.label", "x_title": "ui.train.plot.x",
                                    "y_title": "ui.train.plot.y"},
                                   x="step", y="loss", color="series", color_map=COLORS,
                                   colors_in_legend=[], elem_id="train-loss-plot")
                widget(gr.HTML, {"value": lambda: legend_html("loss")},
                       elem_id="train-loss-legend", padding=False)
                self.weight = widget(gr.Slider,
                                     {"label": "ui.train.smoothing",
                                      "info": "ui.train.smoothing.info"},
                                     0.0, 0.99, value=0.9, step=0.01, elem_id="train-smoothing")
            with gr.Column(scale=2):
                self.log = gr.HTML(log_html(""), elem_id="train-log", **bare)
        self._signal_panels()
        with gr.Row(equal_height=False):
            self.run_pick = widget(gr.Dropdown, {"label": "ui.train.run_pick"}, choices=[],
                                   value=None, elem_id="train-run", scale=3)
            with gr.Column(scale=1, min_width=200):
                self.refresh = _button("ui.train.refresh", elem_id="train-refresh", size="sm")
                self.load_run_cfg = _button("ui.train.run_config", size="sm",
                                            elem_id="train-run-config")
        self.runs_filter = widget(gr.Textbox,
                                  {"label": "ui.train.runs_filter",
                                   "placeholder": "ui.train.runs_filter.placeholder"},
                                  max_lines=1, elem_id="train-runs-filter")
        self.table = widget(gr.Dataframe, {"label": "ui.train.runs", "headers": run_columns},
                            value=[], interactive=False, elem_id="train-runs", max_height=280)
        self.notes = compare_view.NotesPanel(self.saves_dir)
        self.compare = compare_view.ComparePanel(self.saves_dir)
        self.timer = gr.Timer(TICK_S)

    def _signal_panels(self):
        """The stage's own signals (reward margin, accuracy, mean reward, ...): a picker
        and one chart per ticked signal, each on its own scale. Hidden for a run that
        logs none (sft, pt)."""
        with gr.Column(visible=False, elem_id="train-signal-plot") as self.signal_box:
            self.series = widget(gr.CheckboxGroup,
                                 {"label": "ui.train.signals",
                                  "info": ("ui.train.signals.info", {"n": SIGNAL_PANELS})},
                                 choices=[], value=[], elem_id="train-series")
            self.panel_rows, self.panels = [], []
            for first in range(0, SIGNAL_PANELS, PANELS_PER_ROW):
                with gr.Row(equal_height=False, visible=False) as row:
                    self.panel_rows.append(row)
                    for i in range(first, first + PANELS_PER_ROW):
                        # Its label names the signal drawn (_panels); the axis follows here.
                        self.panels.append(widget(gr.LinePlot, {"x_title": "ui.train.plot.x"},
                                                  x="step", y="value", color="series",
                                                  color_map=SIGNAL_COLORS, colors_in_legend=[],
                                                  visible=False, label=t("ui.train.signal"),
                                                  show_label=True,
                                                  elem_id=f"train-signal-plot-{i + 1}"))
            widget(gr.HTML, {"value": lambda: legend_html("signal")},
                   elem_id="train-signal-legend", padding=False)

    def _config_panel(self, defaults: cfg.TrainConfig):
        self.command = widget(gr.Code, {"label": "ui.train.command"},
                              command_text(defaults, self.saves_dir), language="shell",
                              elem_id="train-command", max_lines=24, interactive=False)
        self.memory = gr.Markdown(memory_text(defaults), elem_id="train-memory")
        with gr.Group():
            with gr.Row(equal_height=False):
                self.save_name = widget(gr.Textbox, {"label": "ui.train.save_name"},
                                        value="my-config", max_lines=1,
                                        elem_id="train-config-name", scale=2)
                self.config_file = widget(gr.Dropdown, {"label": "ui.train.config_file"},
                                          choices=configs.available(self.saves_dir), value=None,
                                          elem_id="train-config-file", scale=3)
            with gr.Row():
                self.save_btn = _button("ui.train.save", elem_id="train-config-save", size="sm")
                self.load_btn = _button("ui.train.load", elem_id="train-config-load", size="sm")
                self.upload_cfg = widget(gr.UploadButton, {"label": "ui.train.upload_yaml"},
                                         file_types=[".yaml", ".yml"],
                                         elem_id="train-config-upload", size="sm")
                self.reset_btn = _button("ui.train.reset", elem_id="train-config-reset",
                                         size="sm")
        self.config_msg = gr.Markdown(elem_id="train-config-msg")

    # --- wiring --------------------------------------------------------------------------

    @property
    def signal_outputs(self) -> list:
        return [self.signal_box, self.series] + self.panel_rows + self.panels

    @property
    def view_outputs(self) -> list:
        """What drawing a run updates (`_render`, `tick`), in this order."""
        return [self.status, self.progress, self.plot, self.log] + self.signal_outputs

    def _wire(self):
        widgets = self.form.components
        view = self.view_outputs
        listing = [self.table, self.run_pick]
        quiet = dict(show_progress="hidden")
        # One tick for the run shown and the comparison: no second event per second.
        self.timer.tick(self.tick_all, [self.session, self.compare.state],
                        view + listing + self.compare.outputs, concurrency_limit=None,
                        api_visibility="private", **quiet)
        self.start.click(self.on_start, [self.session] + widgets, view + listing)
        self.abort.click(self.on_abort, [self.session], view + listing, concurrency_limit=None)
        self.resume.click(self.on_resume, [self.session, self.run_pick], view + listing)
        self.queue_cancel.click(self.on_queue_cancel, [self.session], view + listing)
        self.queue_up.click(self.on_queue_up, [self.session], view + listing)
        self.run_pick.input(self.on_pick, [self.session, self.run_pick], view + listing)
        self.table.select(self.on_table_select, [self.session], view + listing)
        self.refresh.click(self.on_refresh, [self.session], listing)
        self.runs_filter.change(self.on_filter, [self.session, self.runs_filter], listing,
                                **quiet)
        self.compare.wire(self.refresh, self.runs_filter)
        self.run_pick.change(self.notes.on_show, [self.run_pick],
                             [self.notes.note, self.notes.tags, self.notes.message], **quiet)
        self.notes.save.click(self.notes.on_save, [self.run_pick, self.notes.note,
                                                   self.notes.tags], [self.notes.message]
                              ).then(self.on_refresh, [self.session], listing, **quiet)
        # The run shown changed (a pick, a reload, a new run), or the tab opened after an
        # evaluation: list the run's eval jobs again.
        self.run_pick.change(self.on_evals, [self.run_pick], [self.evals], **quiet)
        tab = gr.context.Context.block  # the gr.Tab app.py opened
        if hasattr(tab, "select"):
            tab.select(self.on_evals, [self.run_pick], [self.evals], api_visibility="private",
                       **quiet)
        self.weight.change(self.on_weight, [self.session, self.weight],
                           [self.plot] + self.panel_rows + self.panels, **quiet)
        self.series.input(self.on_series, [self.session, self.series],
                          self.panel_rows + self.panels, **quiet)
        gr.on([w.change for w in widgets], self.on_form_change, widgets, [self.command, self.memory],
              trigger_mode="always_last", api_visibility="private", **quiet)
        w = self.form.widgets
        limited = self.form.limited  # settings for some methods or stages only
        gr.on([w["method"].change, w["stage"].change],
              lambda method, stage: form_mod.visibility(method, limited, stage) +
              form_mod.row_visibility(self.form, method, stage),
              [w["method"], w["stage"]],
              [w[n] for n in limited] + [row for row, _ in self.form.limited_rows],
              api_visibility="private", **quiet)
        self._wire_data_and_configs(widgets)
        self._wire_relabel(widgets)
        # A new model, stage or method brings its recommendations; a new stage or dataset
        # folder, the datasets that fit.
        follow = [w["model"].blur, w["model"].submit, w["stage"].change, w["method"].change,
                  w["dataset_dir"].blur, w["dataset_dir"].submit]
        gr.on(follow, self.on_model_change, [self.rec_state] + widgets,
              widgets + [self.recommended, self.rec_state, self.dataset_note],
              api_visibility="private", **quiet)

    def _wire_data_and_configs(self, widgets):
        ds, ds_dir = self.form.widgets["dataset"], self.form.widgets["dataset_dir"]
        self.upload.upload(self.on_upload, [self.upload, self.upload_name, ds_dir, ds,
                                            self.form.widgets["stage"]],
                           [ds, self.upload_status])
        self.preview_btn.click(self.on_preview, widgets, [self.preview_text, self.preview_summary])
        self.save_btn.click(self.on_save, [self.save_name] + widgets,
                            [self.config_file, self.config_msg])
        self.load_btn.click(self.on_load_file, [self.config_file], widgets + [self.config_msg])
        self.upload_cfg.upload(self.on_load_upload, [self.upload_cfg], widgets + [self.config_msg])
        self.reset_btn.click(self.on_reset, [], widgets + [self.config_msg])
        self.load_run_cfg.click(self.on_load_run_config, [self.run_pick],
                                widgets + [self.config_msg])

    def _wire_relabel(self, widgets) -> None:
        """What a language switch redraws besides the labels (webui/i18n.py): the run shown,
        the runs table, the command and memory estimate, the recommended settings' line."""
        redraw(self.on_relabel, [self.session], self.view_outputs + [self.table])
        transient(self.dataset_note, self.upload_status, self.preview_summary, self.preview_text,
                  self.config_msg)
        redraw(self.on_form_change, widgets, [self.command, self.memory])
        w = self.form.widgets
        redraw(on_relabel_recommended, [self.rec_state, w["model"], w["stage"], w["method"]],
               [self.recommended])

    def wire_page_load(self, demo: gr.Blocks) -> None:
        """Reattach when a page opens, and bring back the form the user last started or
        saved; call once the whole app is built."""
        # The form first, then the runs: once the runs list shows, the form is the user's
        # to edit and no late restore can overwrite what they chose.
        demo.load(self.on_restore_form, [],
                  self.form.components + [self.config_msg, self.recommended, self.rec_state],
                  api_visibility="private").then(
            self.on_load, [self.session, self.weight],
            self.view_outputs + [self.table, self.run_pick]).then(
            self.compare.on_choices, [self.compare.runs], [self.compare.runs],
            api_visibility="private")

    # --- the live view -------------------------------------------------------------------

    def _render(self, session: Session, watch: Watch | None) -> list:
        """Every view output, drawn in full (used when a tab switches to another run)."""
        if watch is None or session.watch is None or watch.run_dir != session.watch.run_dir:
            session.series, session.offered = None, ()  # another run: its stage's defaults
        session.watch = watch
        session.holding_message = False
        if watch is None:
            return [status_html(None, None), progress_html(None, []), _empty_plot(),
                    log_html("")] + self._signals(session, None, picker=True)
        watch.poll()
        return [status_html(watch.run_dir, watch.status), progress_html(watch.status,
                watch.records), loss_frame(watch.curves, session.weight),
                log_html(launch.log_tail(runs.log_path(watch.run_dir)))] + \
            self._signals(session, watch, picker=True)

    def _signals(self, session: Session, watch: Watch | None, picker: bool = False) -> list:
        """The signal box, its picker (refreshed when `picker` or the run logged a new
        signal; left alone otherwise, so a tick never undoes a click) and the panels."""
        present = watch.signals if watch else []
        offered = tuple(present)
        box = gr.update(visible=bool(present))
        if picker or offered != session.offered:
            session.offered = offered
            shown = series_to_show(session.series, watch.stage if watch else None, present)
            chooser = gr.update(choices=[(plot.signal_label(n), n) for n in present],
                                value=shown)
        else:
            box, chooser = gr.skip(), gr.skip()
        return [box, chooser] + self._panels(session, watch)

    def _panels(self, session: Session, watch: Watch | None) -> list:
        """Rows and charts of the signal panels: one chart per signal shown, own y scale."""
        present = watch.signals if watch else []
        shown = series_to_show(session.series, watch.stage if watch else None,
                               present)[:SIGNAL_PANELS]
        rows = [gr.update(visible=len(shown) > first)
                for first in range(0, SIGNAL_PANELS, PANELS_PER_ROW)]
        charts = []
        for i in range(SIGNAL_PANELS):
            if i >= len(shown):
                charts.append(gr.update(visible=False))
                continue
            name = shown[i]
            # Only the label and the data change: a changed axis title would make Gradio
            # redraw the chart from its previous data.
            charts.append(gr.update(visible=True, label=plot.signal_label(name),
                                    value=signal_frame(watch.curves, name, session.weight)))
        return rows + charts

    def _listing(self, session: Session) -> list:
        """The runs table and the run picker's choices (its value is the run shown)."""
        session.known_runs = run_names(self.saves_dir)
        session.table_at = _now()
        rows = runs_table(self.saves_dir)
        names = [r[0] for r in rows]
        if session.runs_filter:  # the table is filtered; the picker keeps every run
            rows = runs_table(self.saves_dir, session.runs_filter)
        if session.watch is None:  # leave the picker's value alone: a page load may be setting it
            return [_table(rows), gr.update(choices=names)]
        shown = session.watch.run_dir
        key = next((k for k in (shown.name, str(shown)) if k in names), None)
        if key is None:  # a run the list does not show (a job elsewhere): the picker cannot
            return [_table(rows), gr.update(choices=names)]  # name it, and must not refuse
        return [_table(rows), gr.update(choices=names, value=key)]

    def on_load(self, session: Session, weight: float) -> list:
        """A page (re)opens: reattach to the newest running run, else show the newest run."""
        session.weight = weight
        path = newest_running(self.saves_dir)
        if path is None:
            newest = [r for r in runs.list_runs(self.saves_dir) if r.kind != "eval"]
            path = newest[0].path if newest else None
        view = self._render(session, Watch(path) if path else None)
        return view + self._listing(session)

    def tick(self, session: Session) -> list:
        """Once a second per tab: read only what was appended; skip what did not change."""
        n_view = len(self.view_outputs)
        out = [gr.skip()] * (n_view + 2)
        job_queue.revive(self.saves_dir)  # jobs wait but their runner died: start another
        names = run_names(self.saves_dir)
        new_folder = names != session.known_runs
        watch = session.watch
        if new_folder and not _is_running(watch):
            # A run started elsewhere (another tab, the CLI): follow it.
            path = newest_running(self.saves_dir)
            if path is not None and (watch is None or path != watch.run_dir):
                return self._render(session, Watch(path)) + self._listing(session)
        if watch is None:
            return out[:n_view] + self._listing(session) if new_folder else out
        changes = watch.poll()
        if session.watch is not watch:
            return [gr.skip()] * (n_view + 2)  # the tab switched runs while this tick read
        if changes.status is not None and not session.holding_message:
            out[0] = status_html(watch.run_dir, watch.status)
        if changes.status is not None or changes.metrics is not None:
            out[1] = progress_html(watch.status, watch.records)
        if changes.metrics is not None:
            out[2] = loss_frame(watch.curves, session.weight)
            out[4:n_view] = self._signals(session, watch)
        if changes.log is not None:
            out[3] = log_html(changes.log)
        if new_folder or changes.status is not None or (
                _is_running(watch) and _now() - session.table_at > TABLE_REFRESH_S):
            out[n_view:] = self._listing(session)
        return out

    def on_relabel(self, session: Session) -> list:
        """The run shown and the runs table drawn again in the current language, from what
        the session read (nothing re-read); the charts' colours follow the series' names."""
        watch = session.watch
        table = _table(runs_table(self.saves_dir, session.runs_filter))
        signals = self._signals(session, watch, picker=True)
        if session.holding_message and session.message:
            status = message_html(text_of(session.message[0]), kind=session.message[1])
        else:
            status = status_html(watch.run_dir if watch else None, watch and watch.status)
        if watch is None:
            return [status, progress_html(None, []),
                    _empty_plot(), log_html("")] + \
                signals + [table]
        return [status, progress_html(watch.status, watch.records),
                loss_frame(watch.curves, session.weight),
                log_html(launch.log_tail(runs.log_path(watch.run_dir)))] + signals + [table]

    def on_weight(self, session: Session, weight: float):
        session.weight = weight
        n = len(self.panel_rows) + len(self.panels)
        if session.watch is None:
            return [gr.skip()] * (n + 1)
        return [loss_frame(session.watch.curves, weight)] + self._panels(session, session.watch)

    def on_series(self, session: Session, chosen: list[str] | None) -> list:
        """The user ticked signals: draw those (the picker keeps their choice)."""
        session.series = list(chosen or [])
        return self._panels(session, session.watch)

    def _message(self, session: Session, text, kind: str = "error") -> list:
        """`text`: a str, a Msg or a BadInput, shown in the reader's language."""
        session.holding_message, session.message = True, (text, kind)
        return [message_html(text_of(text), kind=kind)] + [gr.skip()] * (len(self.view_outputs) + 1)

    def _error(self, session: Session, err: BadInput) -> list:
        return self._message(session, err)

    def on_start(self, session: Session, *values) -> list:
        """Validate everything, then launch; on bad input show why and launch nothing."""
        try:
            config = form_mod.to_config(self.form.names, list(values))
            check_inputs(config, self.saves_dir)
            run_dir = launch.start_run(config, self.saves_dir, queue=True)  # busy: queued
        except BadInput as err:
            return self._error(session, err)
        configs.remember(config, self.saves_dir)
        return self._render(session, Watch(run_dir)) + \
            self._listing(session)

    def _queued_run(self, session: Session) -> Path:
        watch = session.watch
        if watch is None or not watch.status or watch.status.get("state") != "queued":
            raise BadInput(msg("ui.train.err.no_queued"))
        return watch.run_dir

    def on_queue_cancel(self, session: Session) -> list:
        return self._on_queued(session, job_queue.cancel)

    def on_queue_up(self, session: Session) -> list:
        return self._on_queued(session, job_queue.move_up)

    def _on_queued(self, session: Session, action) -> list:
        """Cancel or move the queued run shown, then show it again."""
        try:
            run_dir = self._queued_run(session)
            action(self.saves_dir, run_dir)
        except BadInput as err:
            return self._error(session, err)
        return self._render(session, Watch(run_dir)) + self._listing(session)

    def on_abort(self, session: Session) -> list:
        watch = session.watch
        if watch is None or not watch.status or watch.status.get("state") != "running":
            return self._message(session, msg("ui.train.err.no_running"), kind="note")
        try:
            launch.abort_run(watch.run_dir)
        except BadInput as err:
            return self._error(session, err)
        return self._render(session, Watch(watch.run_dir)) + \
            self._listing(session)

    def _run_path(self, run_name: str) -> Path:
        """A run named in the page: only one the runs list shows (found by resolving)."""
        path = find_listed_run(self.saves_dir, run_name)
        if path is None:
            raise BadInput(msg("ui.train.err.not_listed"), file=limits.quote(run_name))
        return path

    def on_resume(self, session: Session, run_name: str | None) -> list:
        if not run_name:
            return self._error(session, BadInput(msg("ui.train.err.pick_resume")))
        try:
            run_dir = self._run_path(run_name)
            # The stored config names paths too: they pass the gate as Start's do.
            paths.confine_config(cfg.load(run_dir / runs.CONFIG), self.saves_dir)
            run_dir = launch.resume_run(run_dir, self.saves_dir)
        except BadInput as err:
            return self._error(session, err)
        return self._render(session, Watch(run_dir)) + \
            self._listing(session)

    def on_pick(self, session: Session, run_name: str | None) -> list:
        try:
            path = self._run_path(run_name) if run_name else None
        except BadInput as err:
            return self._error(session, err)
        return self._render(session, Watch(path) if path else None) + self._listing(session)

    def on_table_select(self, session: Session, evt: gr.SelectData) -> list:
        row = evt.row_value or []
        return self.on_pick(session, str(row[0]) if row else None)

    def on_refresh(self, session: Session) -> list:
        return self._listing(session)

    def on_filter(self, session: Session, query: str | None) -> list:
        session.runs_filter = (query or "").strip()
        return self._listing(session)

    def tick_all(self, session: Session, panel: compare_view.Panel) -> list:
        """The run shown, then the comparison (which costs nothing while no run is picked)."""
        return self.tick(session) + self.compare.tick(panel)

    def on_evals(self, run_name: str | None):
        """The eval jobs of the run shown, each named with its headline result."""
        path = find_listed_run(self.saves_dir, run_name) if run_name else None
        choices = eval_tab.evals_of_run(self.saves_dir, path)
        return gr.update(choices=choices, value=None, visible=bool(choices))

    # --- form, data and config files -----------------------------------------------------

    def on_form_change(self, *values) -> tuple[str, str]:
        try:
            config = form_mod.to_config(self.form.names, list(values))
        except BadInput as err:
            return t("ui.train.command.refused_many") + "".join(
                f"# {line}\n" for line in str(err).splitlines()), gr.skip()
        return command_text(config, self.saves_dir), memory_text(config)

    def on_upload(self, file: str | None, name: str, dataset_dir: str, current: list[str],
                  stage: str = "sft"):
        """Validate and register the file (in the data worker), then add it to the selection
        if the form's stage can train on it, in place of registered datasets it cannot read;
        otherwise say why, and leave the selection alone."""
        if not file:
            return gr.skip(), ""
        try:
            dataset_dir = dataset_dir or "data"
            paths.confine(dataset_dir, "dataset_dir")  # where the upload will be written
            name = limits.check_text(name or "", "register as", limits.MAX_NAME_CHARS).strip()
            key, misfit = data_worker.register_for_stage(file, dataset_dir, name or None,
                                                         stage or "sft")
        except BadInput as err:
            return gr.skip(), t("ui.train.upload.refused", error=text_of(err))
        if misfit:
            return (gr.skip(), t("ui.train.upload.misfit", key=key, folder=dataset_dir,
                                 stage=stage, why=misfit))
        fits = dataset_choices(dataset_dir, stage)
        registered = set(dataset_choices(dataset_dir))
        chosen = [d for d in current or [] if d in fits or d not in registered] + [key]
        return (gr.update(choices=sorted(set(fits) | set(chosen)), value=chosen),
                t("ui.train.upload.done", key=key, folder=dataset_dir))

    def on_preview(self, *values):
        try:
            config = form_mod.to_config(self.form.names, list(values))
            paths.confine_config(config, self.saves_dir)  # the gate Start uses
            answer = data_worker.preview(config)
        except BadInput as err:
            return [], t("ui.train.preview.refused", error=text_of(err))
        shown = preview_highlights(answer)
        used = {mark for _, mark in shown if mark}  # the legend lists only these marks
        return (gr.update(value=shown, color_map={k: v for k, v in preview_colors().items()
                                                  if k in used}),
                preview_summary(answer))

    def _form_values(self, config: cfg.TrainConfig, message: str) -> list:
        return form_mod.values_of(config, self.form.names) + [message]

    def on_save(self, name: str, *values):
        try:
            config = form_mod.to_config(self.form.names, list(values))
            path = configs.save(config, name, self.saves_dir)
        except BadInput as err:
            return gr.skip(), t("ui.train.config.not_saved", error=text_of(err))
        configs.remember(config, self.saves_dir)
        return (gr.update(choices=configs.available(self.saves_dir), value=str(path)),
                t("ui.train.config.saved", path=path))

    def _load(self, path: str | None, allowed: list[str] | None, what: str) -> list:
        if not path:
            return [gr.skip()] * len(self.form.names) + [t("ui.train.config.pick")]
        try:
            config = configs.load(path, allowed)
        except BadInput as err:
            return [gr.skip()] * len(self.form.names) + [
                t("ui.train.config.not_loaded", error=text_of(err))]
        return self._form_values(config, t("ui.train.config.loaded", what=what))

    def on_load_file(self, path: str | None) -> list:
        return self._load(path, configs.available(self.saves_dir), f"`{path}`")

    def on_load_upload(self, file: str | None) -> list:
        return self._load(file, None, t("ui.train.config.uploaded_file"))

    def on_reset(self) -> list:
        return self._form_values(cfg.first_job(), t("ui.train.config.reset"))

    def on_restore_form(self) -> list:
        """A page opens: the form the user last started or saved, else the first job."""
        config = configs.last(self.saves_dir)
        if config is None:
            return [gr.skip()] * (len(self.form.names) + 3)
        rec = recommended_of(config)
        return self._form_values(config, t("ui.train.config.restored")) + \
            [recommended_text(config, rec), rec]

    def on_model_change(self, previous: dict, *values) -> list:
        """Another model, stage or method: the settings still at the old recommendation (or
        the schema default) follow the new one; values the user typed stay."""
        current = dict(zip(self.form.names, values))
        try:
            chosen = cfg.from_mapping({k: current[k] for k in ("model", "stage", "method")})
            rec = recommended_of(chosen)
        except BadInput as err:
            return [gr.skip()] * len(values) + [
                t("ui.train.recommended.unavailable", error=text_of(err)), previous, gr.skip()]
        out, after = [], {}
        for name, value in current.items():
            old = previous.get(name, cfg.default_value(name))
            new = rec.get(name, cfg.default_value(name))
            following = value == form_mod.widget_value(name, old)
            moved = following and new != old
            out.append(form_mod.widget_value(name, new) if moved else gr.skip())
            after[name] = form_mod.widget_value(name, new) if moved else value
        # The datasets offered follow the stage, and a selection it cannot read is replaced.
        # A selection that stays is not sent back: this answer can arrive after the user
        # has picked another dataset (a model typed, then a dataset at once), and sending
        # the value it was asked with would undo that pick.
        choices, fitted, note = fit_datasets(chosen.stage, after["dataset_dir"],
                                             after["dataset"])
        replaced = {"value": fitted} if fitted != list(after["dataset"] or []) else {}
        out[self.form.names.index("dataset")] = gr.update(choices=choices, **replaced)
        return out + [recommended_text(chosen, rec), rec, note]

    def on_load_run_config(self, run_name: str | None) -> list:
        if not run_name:
            return [gr.skip()] * len(self.form.names) + [t("ui.train.config.pick_run")]
        try:
            config = configs.for_new_run(cfg.load(self._run_path(run_name) / runs.CONFIG))
        except BadInput as err:
            return [gr.skip()] * len(self.form.names) + [
                t("ui.train.config.not_loaded", error=text_of(err))]
        return self._form_values(config, t("ui.train.config.copied", run=run_name))


def _now() -> float:
    import time
    return time.monotonic()


def _is_running(watch: Watch | None) -> bool:
    return bool(watch and watch.status and watch.status.get("state") == "running")


def _empty_plot():
    return loss_frame([], 0.9)


def _table(rows: list[list]):
    import pandas as pd
    return pd.DataFrame(rows, columns=run_columns())


def run_columns() -> list[str]:
    """The runs table's headers (RUN_COLUMNS) in the current language."""
    return [t("ui.train.col." + c.replace(" ", "_")) for c in RUN_COLUMNS]


def preview_colors() -> dict[str, str]:
    """PREVIEW_COLORS keyed by the marks' names in the current language (the legend's)."""
    return {t(MARK_IDS[k]): v for k, v in PREVIEW_COLORS.items()}


def _button(key: str, **kwargs) -> gr.Button:
    """A button whose text is the catalogue's `key`, relabelled on a language switch."""
    return widget(gr.Button, {"value": key}, **kwargs)


def check_inputs(config: cfg.TrainConfig, saves_dir: Path | None = None) -> None:
    """What Start checks beyond the schema: every path passes the gate (core/paths.py),
    with the run folder inside the saves folder; every dataset record reads (in a child
    process, see data_worker.py); a model folder holds weights.

    The demo model is built by the trainer on first use, so it is not checked here
    (checking would build it inside the page server).
    """
    if config.resume is True:
        raise BadInput(msg("ui.train.err.resume_true"))
    paths.confine_config(config, saves_dir)
    code = [n for n in config.reward_funcs if n not in cfg.BUILTIN_REWARDS + ("none",)]
    if config.stage == "grpo" and code:
        raise BadInput(msg("ui.train.err.reward_code", name=limits.quote(code[0]),
                           rewards=", ".join(cfg.BUILTIN_REWARDS)), field="reward_funcs")
    data_worker.check(config)
    if config.model != cfg.DEMO_MODEL:
        from core import models  # light: no torch until a model is loaded
        models.resolve_model(config.model)


def recommended_of(config: cfg.TrainConfig) -> dict:
    """The settings the config's model recommends for its stage and method ({} if none)."""
    try:
        return cfg.recommendations(config.model, config.stage, config.method)
    except BadInput:
        return {}


def recommended_text(config: cfg.TrainConfig, rec: dict) -> str:
    """The line under the form saying which values come from the model."""
    where = dict(model=config.model, stage=config.stage, method=config.method)
    if not rec:
        return t("ui.train.recommended.none", **where)
    # the keys in code type: they are config keys (data), in every language
    values = t("list.sep").join(f"`{k}` {cfg.format_value(v)}" for k, v in rec.items())
    return t("ui.train.recommended", file=cfg.RECOMMENDED_FILE, values=values, **where)


def on_relabel_recommended(rec: dict, model: str, stage: str, method: str):
    """The recommended settings' line in the current language, for the form's model."""
    try:
        config = cfg.from_mapping({"model": model, "stage": stage, "method": method})
    except BadInput:
        return gr.skip()  # the line says why already; the next valid change redraws it
    return recommended_text(config, rec or {})


def preview_highlights(answer: dict) -> list[tuple[str, str | None]]:
    """The preview's records as (text, mark) runs: a segment's mark is True for trained
    tokens (sft, pt), or names what it is (chosen, rejected, ...; see PREVIEW_COLORS)."""
    out: list[tuple[str, str | None]] = []
    for i, example in enumerate(answer["examples"], start=1):
        counts = example.get("counts") or \
            t("ui.train.preview.counts", tokens=example["tokens"], trained=example["trained"])
        out.append((t("ui.train.preview.record", i=i, counts=counts) + "\n", None))
        out += [(text, _mark("trained" if mark is True else mark))
                for text, mark in example["segments"]]
        out.append(("\n\n", None))
    return out


def _mark(mark: str | None) -> str | None:
    """A segment's mark as the legend names it (the reader's language)."""
    return t(MARK_IDS[mark]) if mark in MARK_IDS else (mark or None)


def preview_summary(answer: dict) -> str:
    s = answer["summary"]
    scope = (t("ui.train.preview.scope_first", measured=s["measured"], records=s["records"])
             if s["measured"] < s["records"] else t("ui.train.preview.scope_all",
                                                    records=s["records"]))
    prompts = answer.get("stage") == "grpo"  # a prompt too long to reply to is left out
    return t("ui.train.preview.summary", records=s["records"], scope=scope,
             what=t("ui.train.preview.prompt_tokens" if prompts else "ui.train.preview.tokens"),
             min=s["min"], median=f"{s['median']:g}", max=s["max"], over=s["over_cutoff"],
             cutoff=s["cutoff_len"],
             fate=t("ui.train.preview.skipped" if prompts else "ui.train.preview.truncated"))


def _new_session() -> Session:
    return Session()
