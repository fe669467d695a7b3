"""What the page shows about a run, read from its run directory and nothing else.

`Watch` follows one run for one browser session: it remembers file signatures
and the metrics byte offset, so a tick that finds nothing new costs a few
`stat` calls and the page is not redrawn; new metrics lines are added to the
run's curves (core.plot.Curves) as they arrive. No Gradio here; app code turns
`Changes` into component updates.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import html
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from core import compare, i18n, job_queue, jobs, launch, paths, plot, runs, schema
from core.errors import BadInput
from core.i18n import t

LOG_LINES = 30
MAX_POINTS = 1500          # per series sent to the browser; longer runs are thinned
LIVENESS_EVERY_S = 5.0     # how often a "running" status is checked against the process
SERIES = {"raw": "loss", "smoothed": "smoothed loss", "eval": "eval loss"}
COLORS = {SERIES["raw"]: "#b9cdf2", SERIES["smoothed"]: "#1d3f8f", SERIES["eval"]: "#e4572e"}
# A stage's own signals (core.plot.SIGNALS), one panel each, drawn like the loss.
SIGNAL_SERIES = {"raw": "raw", "smoothed": "smoothed", "eval": "eval"}
SIGNAL_COLORS = {SIGNAL_SERIES[k]: COLORS[SERIES[k]] for k in SERIES}


# The series are named in the charts' data by these fixed keys, in every language, and the
# charts draw no legend of their own: `legend_html` is the legend, in the reader's language.
# Gradio's line plot keeps the legend (and colour scale) of the names it first drew: data
# renamed to another language drew no lines at all under the old names.
def legend_html(kind: str = "loss") -> str:
    """A chart's legend: a swatch and a name per series ("loss" for the loss chart,
    "signal" for the stage-signal panels)."""
    prefix = "ui.runs.series." if kind == "loss" else "ui.runs.signal_series."
    items = "".join(f"<span class='tb-legend-item'><span class='tb-swatch' "
                    f"style='background:{COLORS[SERIES[k]]}'></span>"
                    f"{html.escape(t(prefix + k))}</span>" for k in SERIES)
    return f"<div class='tb-legend' data-kind='{kind}'>{items}</div>"


def word(prefix: str, value: str) -> str:
    """A known word of the run files (a state, a phase, a unit) in the current language;
    anything else as written."""
    key = prefix + str(value).replace(" ", "_")
    return t(key) if i18n.has(key) else str(value)


def state_name(state: str) -> str:
    return word("ui.runs.state.", state)


@dataclass
class Changes:
    """What a tick found; None means unchanged (the page keeps what it shows)."""
    status: dict | None = None
    metrics: list | None = None     # every record so far, when new ones arrived
    log: str | None = None

    def __bool__(self) -> bool:
        return any(x is not None for x in (self.status, self.metrics, self.log))


@dataclass
class Watch:
    """One browser session's view of one run directory."""
    run_dir: Path
    tail: runs.MetricsTail = None
    status: dict | None = None
    status_sig: tuple | None = None
    log_sig: tuple | None = None
    checked_at: float = 0.0
    curves: plot.Curves = None

    def __post_init__(self):
        self.run_dir = Path(self.run_dir)
        self.tail = runs.MetricsTail(self.run_dir / runs.METRICS)
        self.curves = plot.Curves()

    def poll(self) -> Changes:
        """Read only what changed since the last poll."""
        out = Changes()
        sig = runs.file_signature(self.run_dir / runs.STATUS)
        running = bool(self.status) and self.status.get("state") == "running"
        stale = running and time.monotonic() - self.checked_at > LIVENESS_EVERY_S
        if sig != self.status_sig or stale or self.status is None:
            # read_status also notices a trainer that died without a word.
            status = runs.read_status(self.run_dir)
            self.checked_at = time.monotonic()
            self.status_sig = runs.file_signature(self.run_dir / runs.STATUS)
            if status != self.status:
                self.status = out.status = status
        new = self.tail.poll()
        if new:
            self.curves.add(new)  # only the new lines: the history is never rescanned
            out.metrics = self.tail.records
        sig = runs.file_signature(runs.log_path(self.run_dir))
        if sig != self.log_sig:
            self.log_sig = sig
            out.log = launch.log_tail(runs.log_path(self.run_dir), LOG_LINES)
        return out

    @property
    def records(self) -> list[dict]:
        return self.tail.records

    @property
    def stage(self) -> str:
        return run_stage(self.run_dir)

    @property
    def signals(self) -> list[str]:
        """The stage signals this run has logged so far (core.plot.SIGNALS order)."""
        return plot.signal_names(self.curves.keys())


# --- rendering -------------------------------------------------------------------

def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def _last_with(records: list[dict], key: str) -> dict | None:
    return next((r for r in reversed(records) if r.get(key) is not None), None)


def progress_html(status: dict | None, records: list[dict]) -> str:
    """A progress bar with step, epoch, elapsed time, ETA, throughput and padding waste."""
    if status is None:
        return f"<div class='tb-progress tb-idle'>{t('ui.runs.progress.none')}</div>"
    last = records[-1] if records else {}
    total, step = last.get("total_steps") or 0, last.get("step") or 0
    state = status.get("state", "?")
    done = state == "completed"
    frac = 1.0 if done else (step / total if total else 0.0)
    parts = []
    if total:
        unit = last.get("unit")  # an eval job counts replies, batches or tasks
        parts.append(t("ui.runs.progress.units", step=step, total=total,
                       unit=word("ui.runs.unit.", unit)) if unit
                     else t("ui.runs.progress.step", step=step, total=total))
    if last.get("epoch") is not None:
        parts.append(t("ui.runs.progress.epoch", epoch=f"{last['epoch']:.2f}"))
    if last.get("elapsed_s") is not None:
        parts.append(t("ui.runs.progress.elapsed", time=fmt_duration(last["elapsed_s"])))
    if state == "running" and last.get("eta_s") is not None:
        parts.append(t("ui.runs.progress.eta", time=fmt_duration(last["eta_s"])))
    evaluated = _last_with(records, "eval_loss")
    if evaluated:
        parts.append(t("ui.runs.progress.eval_loss", loss=f"{evaluated['eval_loss']:.4f}"))
    speed = _last_with(records, "tokens_per_s")
    if speed:
        parts.append(t("ui.runs.progress.speed", speed=f"{speed['tokens_per_s']:,.0f}"))
    packed = _last_with(records, "nonpad_share")
    if packed:  # how much of each batch is real tokens rather than padding
        parts.append(t("ui.runs.progress.nonpad", share=f"{packed['nonpad_share']:.0%}"))
    phase = status.get("phase")
    if state == "running" and (not records or phase not in (None, "training")):
        phase = runs.phase_text(phase)
        parts.append(html.escape(t("ui.runs.progress.phase", phase=phase)))
    text = " · ".join(parts) or html.escape(state_name(state))
    return (f"<div class='tb-progress tb-{html.escape(state)}'>"
            f"<div class='tb-bar'><div class='tb-fill' style='width:{frac * 100:.1f}%'></div></div>"
            f"<div class='tb-progress-text'>{round(frac * 100)}% · {text}</div></div>")


def status_html(run_dir: Path | None, status: dict | None) -> str:
    """The run's state, times and, for a failed run, its error text."""
    if run_dir is None or status is None:
        return f"<div class='tb-status'>{t('ui.runs.status.none')}</div>"
    state = status.get("state", "?")
    when = _short_time(status.get("started_at"))
    if status.get("ended_at"):
        when += " → " + _short_time(status["ended_at"])
    out = (f"<div class='tb-status'><span class='tb-badge tb-{html.escape(state)}'>"
           f"{html.escape(state_name(state))}</span> <b>{html.escape(run_dir.name)}</b> "
           f"<span class='tb-dim'>{html.escape(when)} · {html.escape(str(run_dir))}</span>")
    if state == "queued":
        note = html.escape(job_queue.waiting_text(run_dir))
        out += f"<pre class='tb-note tb-queue'>{note}</pre>"
    error = runs.error_text(status)  # in the reader's language when the job recorded it
    if error:
        kind = "tb-error" if state == "failed" else "tb-note"  # "stopped by the user" is no error
        out += f"<pre class='{kind}'>{html.escape(error)}</pre>"
    if status.get("stopped_early"):
        out += f"<pre class='tb-note'>{html.escape(runs.stopped_early_text(status))}</pre>"
    return out + "</div>"


def message_html(text: str, kind: str = "error") -> str:
    """A message from the page itself (bad input, refusal), in the status box."""
    badge, box = ("refused", "tb-error") if kind == "error" else (kind, "tb-note")
    return (f"<div class='tb-status'><span class='tb-badge tb-{badge}'>"
            f"{t('ui.runs.badge.not_started') if kind == 'error' else html.escape(state_name(kind))}"
            "</span>"
            f"<pre class='{box}'>{html.escape(text)}</pre></div>")


def log_html(text: str, name: str = runs.LOG) -> str:
    """The log tail in a box that stays scrolled to its newest line (`name`: the log's)."""
    empty = f"<span class='tb-dim'>{html.escape(t('ui.runs.log.empty'))}</span>"
    body = html.escape(text) if text else empty
    title = t("ui.runs.log.title", name=name, lines=LOG_LINES)
    return (f"<div class='tb-log-title'>{html.escape(title)}</div>"
            f"<div class='tb-log'><pre>{body}</pre></div>")


def _short_time(iso: str | None) -> str:
    if not iso:
        return ""
    try:
        return dt.datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return iso


def _thin(steps: list, values: list) -> tuple[list, list]:
    """Every k-th point (always keeping the last) so a long run stays light to draw."""
    if len(steps) <= MAX_POINTS:
        return steps, values
    k = math.ceil(len(steps) / MAX_POINTS)
    idx = list(range(0, len(steps), k))
    if idx[-1] != len(steps) - 1:
        idx.append(len(steps) - 1)
    return [steps[i] for i in idx], [values[i] for i in idx]


def _curve_rows(steps: list, raw: list, eval_steps: list, eval_values: list, weight: float,
                names: dict) -> list[tuple]:
    """(step, value, series) rows: raw, smoothed and eval, thinned, finite values only.

    A series with no point yet gets one row without a value (NaN, which the chart does
    not draw): Gradio's chart fixes its colours to the series of the first frame it
    draws and only swaps the data afterwards, so a series that appeared later (the eval
    points, at the end of an epoch) would be drawn without a colour, invisible.
    """
    rows = []
    first = steps[0] if steps else (eval_steps[0] if eval_steps else 0)
    for name, (xs, ys) in ((names["raw"], _thin(steps, raw)),
                           (names["smoothed"], _thin(steps, runs.smooth(raw, weight))),
                           (names["eval"], (eval_steps, eval_values))):
        drawn = [(x, y, name) for x, y in zip(xs, ys) if math.isfinite(y)]
        rows += drawn or [(first, math.nan, name)]
    return rows


def loss_frame(records: list[dict] | plot.Curves, weight: float) -> pd.DataFrame:
    """Long-form frame (step, loss, series) with raw, smoothed and eval loss.

    Uses core.plot.loss_series, as loss.png does: a resumed run re-logs the steps
    after its checkpoint, and the latest line for a step wins. A watcher passes its
    `curves`, kept up to date line by line.
    """
    rows = _curve_rows(*plot.loss_series(records), weight, SERIES)
    return pd.DataFrame(rows, columns=["step", "loss", "series"])


def signal_frame(curves: plot.Curves, name: str, weight: float) -> pd.DataFrame:
    """Long-form frame (step, value, series) of one stage signal (core.plot.SIGNALS):
    raw, smoothed with the loss chart's weight, and its eval_ points."""
    rows = _curve_rows(*plot.signal_series(curves, name), weight, SIGNAL_SERIES)
    return pd.DataFrame(rows, columns=["step", "value", "series"])


def series_to_show(chosen: list[str] | None, stage: str | None, present: list[str]) -> list[str]:
    """The signal panels to draw: what the user ticked, else the stage's headline signals;
    only those the run has logged."""
    if chosen is None:
        return plot.headline(stage, present)
    return [name for name in chosen if name in present]


# One text setting of a run's or eval job's config.yaml, read once per version of the file.
_config_values: dict[tuple[Path, str], tuple[tuple | None, str]] = {}


def config_value(folder: Path, key: str) -> str:
    """A text setting from a folder's config.yaml ('?' when it cannot be read)."""
    path = Path(folder)
    sig = runs.file_signature(path / runs.CONFIG)
    cached = _config_values.get((path, key))
    if cached and cached[0] == sig:
        return cached[1]
    try:
        value = schema.read_yaml(path / runs.CONFIG).get(key) if sig else None
    except (BadInput, OSError):
        value = None
    _config_values[(path, key)] = (sig, value if isinstance(value, str) else "?")
    return _config_values[(path, key)][1]


def run_stage(run_dir: Path) -> str:
    """The run's training stage ('?' when it cannot be read)."""
    return config_value(run_dir, "stage")


def outside_running(saves_dir: Path, listed: list[Path] | None = None) -> list[Path]:
    """Running jobs whose folder is not in the saves folder (started from a terminal with
    another output_dir) but lies inside the allowed folders: they are listed too, so any
    tab can watch and abort them. Keyed in the page by their path. `listed`: the saves
    folder's runs, when the caller has scanned them already."""
    inside = {p.resolve() for p in (runs.run_dirs(saves_dir) if listed is None else listed)}
    return [job.run_dir for job in jobs.active()
            if job.run_dir not in inside and paths.is_allowed(job.run_dir)
            and kind_of(job.run_dir) != "export"]  # saves/exports/*: the Export tab's


def listed_runs(saves_dir: Path) -> list[runs.RunSummary]:
    """What the runs list shows: every run in the saves folder, then running jobs elsewhere."""
    found = runs.list_runs(saves_dir)
    for path in outside_running(saves_dir):
        summary = runs.summarize(path)
        if summary is not None:
            found.append(dataclasses.replace(summary, name=str(path)))
    return found


def find_listed_run(saves_dir: Path, key: str) -> Path | None:
    """The folder of a run the list shows under `key`; None for anything else."""
    path = runs.find_run(saves_dir, key)
    if path is None:
        path = next((p for p in outside_running(saves_dir) if str(p) == key), None)
    return path


def stage_or_kind(run: runs.RunSummary) -> str:
    """The runs list's stage column: a run's training stage, or "eval: <task>" for an eval
    job (core/evaluate.py), which the list shows beside the runs."""
    if run.kind == "eval":
        return t("ui.runs.eval_task", task=eval_task_of(run.path))
    return run_stage(run.path)


def eval_task_of(job_dir: Path) -> str:
    """An eval job's eval_task ('?' when it cannot be read)."""
    return config_value(job_dir, "eval_task")


def runs_table(saves_dir: Path, query: str = "") -> list[list]:
    """Rows for the runs list: name, state, steps, final loss, stage (or eval: task),
    started; with a `query`, only the runs it matches (core.compare.matches: tags, text)."""
    rows = []
    for run in listed_runs(saves_dir):
        if query and not compare.matches(run.path, query):
            continue
        loss = f"{run.final_loss:.4f}" if run.final_loss is not None else "–"
        rows.append([run.name, state_label(run.path, run.state), run.steps, loss,
                     stage_or_kind(run),
                     _short_time(run.started_at) or "–"])
    return rows


def state_label(run_dir: Path, state: str) -> str:
    """The runs list's state column (job_queue.state_label's, in the reader's language):
    `queued #2` for a waiting job."""
    if state != "queued":
        return state_name(state)
    n = job_queue.position(run_dir)
    return t("ui.runs.state.queued_at", n=n) if n else state_name(state)


def newest_running(saves_dir: Path) -> Path | None:
    """The training run to reattach to when a page opens: the newest one still going that
    the list shows (an eval job is the Evaluate tab's to show)."""
    saves = Path(saves_dir).resolve()
    busy = [r for r in launch.running_runs(saves_dir)  # those in saves/, and others it lists
            if (r.path.resolve().parent == saves or paths.is_allowed(r.path.resolve()))
            and kind_of(r.path) == "train"]
    if not busy:
        return None
    return max(busy, key=lambda r: r.started_at).path


def kind_of(folder: Path) -> str:
    """What a job folder holds: "train" (a run), "eval" or "export" (their tabs' jobs)."""
    return (runs.read_status_raw(folder) or {}).get("kind") or "train"


def run_names(saves_dir: Path) -> list[str]:
    """Keys of the listed runs, from a cheap scan (to notice new runs on each tick)."""
    listed = runs.run_dirs(saves_dir)
    return [p.name for p in listed] + [str(p) for p in outside_running(saves_dir, listed)]
