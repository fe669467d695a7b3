"""The Export tab: a front end to `tunebench export`, run as a job.

Start writes an export job folder under saves/exports and runs `tunebench export` on it
detached (core/launch.py's start_export; core/export_job.py describes the folder), as the
Evaluate tab runs eval jobs. From then on the page only reads the folder back: status.json,
metrics.jsonl (the progress bar, its steps and ETA) and result.json (the verification
report and the command line that reproduces it). A closed browser loses nothing; a page
that opens reattaches to the running export, else shows the newest one. No torch here.
A reward model (the result of a stage rm run) is exported as a sequence classifier;
picking one says so under the pickers.
"""

from __future__ import annotations

import dataclasses
import html
from pathlib import Path

import gradio as gr

from core import config as cfg
from core import export_job, job_queue, launch, paths, runs, schema
from core.errors import BadInput
from core.i18n import msg, recorded, t

from . import form
from .i18n import redraw, widget
from .chat_tab import (base_of_picked, checkpoint_choices, model_choices, model_pickers,
                       progress_html, reward_picked)
from .runs_view import fmt_duration

TICK_S = 2.0  # an export is minutes long; every open tab ticks, so tick half as often as Train


def idle_html() -> str:
    return f"<div class='tb-status tb-idle'>{html.escape(t('ui.export.idle'))}</div>"


@dataclasses.dataclass
class Session:
    """Which export job one browser tab shows. Lives in gr.State, never in the server."""
    folder: Path | None = None
    seen: tuple | None = None      # the job files' signatures when last drawn
    attached: bool = False         # the first tick looked for a job to show
    holding_message: bool = False  # a refusal stays until the user acts again
    refusal: BadInput | None = None  # that refusal, to redraw it in another language


def default_export_dir(saves: Path, checkpoint: str) -> str:
    """saves/exports/<run>-<checkpoint>, e.g. saves/exports/lora-20261122-final."""
    if not checkpoint:
        return str(Path(saves) / "exports" / "model")
    ckpt = Path(checkpoint)
    return str(Path(saves) / "exports" / f"{ckpt.parent.name}-{ckpt.name}")


def result_html(result: dict) -> str:
    """The verification checks as a list, under a verified / not verified badge."""
    ok = result["ok"]
    badge = t(("ui.export.verified" if result.get("verified") else "ui.export.written") if ok
              else "ui.export.not_verified")
    kind = "completed" if ok else "failed"
    # The checks' names and details as result.json keeps them, in the reader's language.
    items = "".join(f"<li class='tb-check-{'ok' if c['ok'] else 'fail'}'>"
                    f"{'✓' if c['ok'] else '✗'} <b>{html.escape(recorded(c, 'name'))}</b>: "
                    f"{html.escape(recorded(c, 'detail'))}</li>" for c in result["checks"])
    where = (t("ui.export.written_to", out=f"<code>{html.escape(result['out'])}</code>") if ok
             else html.escape(t("ui.export.nothing_kept")))
    fmt = result.get("format", "safetensors")
    size = f"{result['size_mb']:.1f}"
    files = (t("ui.export.files", shards=result["shards"], size=size, dtype=result["dtype"])
             if fmt == "safetensors" else
             t("ui.export.files_other", format=fmt, shards=result["shards"], size=size,
               weights=html.escape(str(result.get("weights", "")))))
    summary = t("ui.export.summary", where=where, files=files,
                peak=f"{result['peak_rss_mb']:.0f}", model=f"{result['model_mb']:.0f}")
    return (f"<div class='tb-status' id='export-result' data-ok='{str(ok).lower()}' "
            f"data-format='{html.escape(fmt)}'>"
            f"<span class='tb-badge tb-{kind}'>{html.escape(badge)}</span> {summary}"
            f"<ul class='tb-checks'>{items}</ul></div>")


def failure_html(text: str, label: str | None = None) -> str:
    label = t("ui.export.failed") if label is None else label
    return (f"<div class='tb-status'><span class='tb-badge tb-error'>{html.escape(label)}"
            f"</span><pre class='tb-error'>{html.escape(text)}</pre></div>")


def job_html(folder: Path) -> str:
    """What an export job is doing or did, from its folder alone."""
    status = runs.read_status(folder) or {}
    state = status.get("state")
    records = runs.read_metrics(folder)
    last = records[-1] if records else {}
    name = f"<span class='tb-dim'>{html.escape(t('ui.export.job', name=folder.name))}</span>"
    if state == "running":
        step, total = last.get("step", 0), last.get("total_steps") or export_job.TOTAL_STEPS
        parts = [t("ui.export.step", step=step, total=total),
                 t("ui.export.elapsed", time=fmt_duration(last.get("elapsed_s")))]
        if last.get("eta_s") is not None:
            parts.append(t("ui.export.eta", time=fmt_duration(last["eta_s"])))
        # The exporter's own progress words (metrics.jsonl), in the reader's language.
        message = (recorded(last, "message") or recorded(status, "phase")
                   or t("ui.export.starting"))
        return (progress_html(step / total, f"{step / total:.0%} · {' · '.join(parts)} · "
                              f"{message}") + name)
    if state == "queued":
        text = t("ui.export.queued", waiting=job_queue.waiting_text(folder))
        return (f"<div class='tb-status' id='export-queued'><span class='tb-badge tb-queued'>"
                f"{html.escape(t('ui.export.queued_badge'))}</span> {html.escape(text)}</div>"
                + name)
    result = export_job.read_result(folder)
    if result is not None:
        return result_html(result) + name
    error = runs.error_text(status)
    if state == "aborted":
        return failure_html(error or t("ui.export.stopped_text"),
                            t("ui.export.stopped")) + name
    return failure_html(error or t("ui.export.ended", state=state)) + name


def job_command(folder: Path) -> str:
    result = export_job.read_result(folder) or {}
    if result.get("command"):
        return result["command"]
    job = export_job.read_job(folder)
    return runs_command(job) if job else ""


def runs_command(job: export_job.ExportJob) -> str:
    import shlex
    return shlex.join(export_job.command_line(job))


def estimate_text(job: export_job.ExportJob) -> str:
    """The size estimate under the settings: the files, and the disk needed while it runs."""
    try:
        sizes = export_job.size_estimate(job)
    except (BadInput, KeyError, OSError):
        sizes = None
    if not sizes:
        return t("ui.export.estimate_unknown")
    if sizes["disk"] > sizes["output"]:
        return t("ui.export.estimate_disk", size=_mb(sizes["output"]), disk=_mb(sizes["disk"]))
    return t("ui.export.estimate", size=_mb(sizes["output"]))


def _mb(size: float) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


class ExportTab:
    """Builds the Export tab inside the current gr.Tab and wires its events."""

    def __init__(self, saves: Path):
        self.saves = Path(saves)
        self.session = gr.State(_new_session)  # a fresh Session per browser tab
        with gr.Row():
            self.model, self.checkpoint = model_pickers(self.saves, "export")
            self.refresh = gr.Button("↻", scale=0, min_width=40, size="sm",
                                     elem_id="export-refresh")
        self.hint = gr.Markdown("", elem_id="export-hint")
        # Generated from core.config.ExportConfig, as `tunebench export`'s flags are.
        self.settings = form.build_settings(cfg.ExportConfig, cfg.ExportConfig(), "export")
        self.widgets = self.settings.widgets
        self.widgets["gguf_type"].visible = False  # shown for format gguf only
        self.estimate = gr.Markdown(estimate_text(export_job.ExportJob()),
                                    elem_id="export-estimate")
        self.out = widget(gr.Textbox, {"label": "ui.export.out"},
                          default_export_dir(self.saves, ""), elem_id="export-dir")
        with gr.Row():
            self.overwrite = widget(gr.Checkbox, {"label": "ui.export.overwrite"}, False,
                                    elem_id="export-overwrite")
            self.verify = widget(gr.Checkbox, {"label": "ui.export.verify"}, True,
                                 elem_id="export-verify")
        with gr.Row():
            self.start = widget(gr.Button, {"value": "ui.export.start"}, variant="primary",
                                elem_id="export-start")
            self.abort = widget(gr.Button, {"value": "ui.export.stop"}, variant="stop",
                                elem_id="export-abort")
        self.status = gr.HTML(idle_html(), elem_id="export-status")
        self.command = widget(gr.Code, {"label": "ui.export.command"}, language="shell",
                              elem_id="export-command", interactive=False, lines=2, max_lines=4)
        self.timer = gr.Timer(TICK_S)
        self._wire()
        self._redraws()

    def _redraws(self):
        """What a language switch redraws: the hint, the size estimate and the job's state."""
        w = self.widgets
        redraw(self.reward_hint, [self.checkpoint, self.model], [self.hint])
        redraw(self.on_settings, [self.model, self.checkpoint, self.out, self.overwrite,
                                  self.verify] + self.settings.components,
               [w["gguf_type"], w["shard_size"], self.estimate])
        redraw(self.redraw_job, [self.session], [self.status, self.command])

    def _wire(self):
        self.refresh.click(self.refresh_choices, [self.model, self.checkpoint],
                           [self.model, self.checkpoint])
        self.checkpoint.change(self.pick_checkpoint, [self.checkpoint, self.model],
                               [self.model, self.out, self.hint])
        inputs = [self.model, self.checkpoint, self.out, self.overwrite,
                  self.verify] + self.settings.components
        w = self.widgets
        for trigger in (w["format"], w["gguf_type"], w["dtype"], self.model, self.checkpoint):
            trigger.change(self.on_settings, inputs, [w["gguf_type"], w["shard_size"],
                                                      self.estimate],
                           show_progress="hidden", api_visibility="private")
        self.start.click(self.do_export, [self.session] + inputs,
                         [self.status, self.command], concurrency_limit=1)
        self.abort.click(self.on_abort, [self.session], [self.status, self.command],
                         concurrency_limit=None)
        self.timer.tick(self.tick, [self.session], [self.status, self.command],
                        concurrency_limit=None, show_progress="hidden",
                        api_visibility="private")
        tab = gr.context.Context.block  # the gr.Tab app.py opened: refresh lists on opening it
        if hasattr(tab, "select"):
            tab.select(self.refresh_choices, [self.model, self.checkpoint],
                       [self.model, self.checkpoint])

    def refresh_choices(self, model: str, checkpoint: str):
        return (gr.update(choices=model_choices(self.saves), value=model),
                gr.update(choices=checkpoint_choices(self.saves), value=checkpoint))

    def pick_checkpoint(self, checkpoint: str, model: str):
        base = base_of_picked(checkpoint)
        return (gr.update(value=base or model), default_export_dir(self.saves, checkpoint),
                self.reward_hint(checkpoint, model))

    def reward_hint(self, checkpoint: str, model: str) -> str:
        return t("ui.export.reward_hint") if reward_picked(checkpoint, model) else ""

    def _job(self, model, checkpoint, out, overwrite, verify, values) -> export_job.ExportJob:
        """The form as an ExportJob; typed paths stay inside the allowed roots."""
        settings = form.settings_of(cfg.ExportConfig, self.settings.names, list(values),
                                    msg("ui.export.settings_source"))  # rendered when shown
        model = paths.confine_model(model or "")
        checkpoint = (str(paths.confine(checkpoint, "checkpoint", must_exist=True))
                      if (checkpoint or "").strip() else "")
        out = str(paths.confine(out or "", "export folder"))
        return export_job.ExportJob(model=model, adapter=checkpoint, out=out,
                                    overwrite=bool(overwrite), verify=bool(verify),
                                    **schema.to_dict(settings))

    def on_settings(self, model, checkpoint, out, overwrite, verify, *values):
        raw = dict(zip(self.settings.names, values))
        gguf = raw.get("format") == "gguf"
        try:
            job = self._job(model, checkpoint, out, overwrite, verify, values)
            text = estimate_text(job)
        except BadInput as err:
            text = f"⚠ {err}"
        return (gr.update(visible=gguf), gr.update(visible=raw.get("format") == "safetensors"),
                text)

    def do_export(self, session: Session, model, checkpoint, out, overwrite, verify, *values):
        try:
            job = self._job(model, checkpoint, out, overwrite, verify, values)
            folder = launch.start_export(job, self.saves, queue=True)  # busy: queued
        except BadInput as err:
            session.holding_message, session.refusal = True, err
            return failure_html(str(err)), gr.skip()
        session.folder, session.seen, session.holding_message = folder, None, False
        session.refusal = None
        session.attached = True
        return job_html(folder), job_command(folder)

    def on_abort(self, session: Session):
        folder = session.folder
        status = runs.read_status(folder) if folder else None
        state = (status or {}).get("state")
        if state not in ("running", "queued"):
            return gr.skip(), gr.skip()
        try:
            launch.stop_job(folder, self.saves)
        except BadInput as err:
            return failure_html(str(err)), gr.skip()
        session.seen = None
        return job_html(folder), job_command(folder)

    def redraw_job(self, session: Session):
        """The shown job (or refusal) drawn again, in the language just chosen."""
        if session.holding_message and session.refusal is not None:
            return failure_html(str(session.refusal)), gr.skip()
        if session.folder is None:
            return idle_html(), gr.skip()
        return job_html(session.folder), gr.skip()

    def tick(self, session: Session):
        """Once a second: reattach on the first tick (the running export, else the newest
        one); redraw the shown job only when its files changed."""
        if not session.attached:
            session.attached = True
            jobs = export_job.export_jobs(self.saves)
            session.folder = export_job.newest_running(self.saves) or (
                jobs[0].path if jobs else None)
        elif session.folder is None or session.holding_message:
            running = export_job.newest_running(self.saves)  # started in another tab
            if running is None or session.holding_message:
                return gr.skip(), gr.skip()
            session.folder = running
        folder = session.folder
        if folder is None:
            return gr.skip(), gr.skip()
        seen = tuple(runs.file_signature(folder / name) for name in
                     (runs.STATUS, runs.METRICS, export_job.RESULT))
        if seen == session.seen:
            return gr.skip(), gr.skip()
        session.seen = seen
        return job_html(folder), job_command(folder)


def _new_session() -> Session:
    return Session()


def build(saves: Path | str | None = None) -> ExportTab:
    """Create the Export tab's contents inside the gr.Tab the caller opened."""
    if saves is None:
        saves = paths.saves_root()
    return ExportTab(Path(saves))
