"""The Evaluate tab: a front end to `tunebench eval`, as the Train tab is to `tunebench train`.

Start checks every input in a data-worker child (core.evaluate.check needs transformers,
which the page server never imports), then core.launch.start_eval writes the job folder
and starts the CLI detached. From then on everything shown is read back from job folders:
status.json, metrics.jsonl (the progress bar), eval.log, results.json and
predictions.jsonl. Which job a browser tab shows, its page of predictions and the job it
compares with live in a `gr.State`; a closed browser or a restarted server loses nothing.

The form is generated from core.config.EvalConfig by webui/form.py's machinery; only
the pickers whose choices come from the saves folder (model, checkpoint) and the task
picker are made here, with the schema's label and help.

Every text comes from the catalogue (ui.eval.*; metric, task and model names are data and
stay as written). A language switch relabels the widgets (webui/i18n.py's `tr`) and redraws
the job shown, the jobs list and the upload note from the session (`EvalTab.relabel`).
"""

from __future__ import annotations

import dataclasses
import html
import math
from pathlib import Path
from typing import Any, Callable

import gradio as gr
import yaml

from core import config as cfg
from core import data, eval_tasks, evaluate, i18n, launch, models, paths, runs, schema
from core.errors import BadInput
from core.i18n import msg, t, text_of

from . import data_worker, form, runs_view
from .chat_tab import model_choices
from .i18n import redraw, tr, widget
from .runs_view import Watch, _short_time, log_html, message_html, progress_html, status_html

TICK_S = 1.0
PAGE_SIZE = 10
JOB_COLUMNS = ["job", "task", "dataset", "state", "result", "started"]
NO_CHECKPOINT = t("ui.eval.no_checkpoint", "en")   # the checkpoint picker's empty choice
# Element ids that shared/SPEC.md fixes; every other setting gets "eval-<key>".
SPEC_IDS = {"adapter": "eval-checkpoint", "eval_task": "eval-task"}
LABELS = {"adapter": "ui.eval.label.adapter", "eval_task": "ui.eval.label.eval_task"}
# The first row: what is evaluated, and on what. The rest follow in schema order.
PICKERS = ("model", "adapter", "eval_task")
WHAT_ON = ("dataset", "harness_tasks")
# The page always writes the job to saves/eval-<task>-<date>-<time> (launch.start_eval).
NOT_IN_FORM = ("output_dir",)
# Settings only some tasks read (the schema's `tasks=`), hidden for the others.
FOR_TASKS = {name: f.metadata["tasks"] for name, f in schema.fields(cfg.EvalConfig).items()
             if f.metadata.get("tasks")}
# The kinds of dataset (core.data.dataset_kind) each task reads.
TASK_KINDS = {name: task.reads for name, task in eval_tasks.TASKS.items()}
# The metric that sums a job up in the lists, per task.
HEADLINE = {"loss": "loss", "predict": "rouge_l", "choice": "accuracy", "harness": "accuracy",
            "probes": "mentions_name"}
WRITES_PREDICTIONS = ("predict", "probes")   # the tasks with a predictions.jsonl
LOWER_IS_BETTER = ("loss", "perplexity")
NOT_COMPARED = ("tokens", "accuracy_stderr")   # no better or worse: sizes and spreads


def metric_help(name: str) -> str:
    """A metric's tooltip (`ui.eval.metric.<name>`); an unknown metric's is its name."""
    key = f"ui.eval.metric.{name}"
    return t(key) if i18n.has(key) else name


def no_job() -> str:
    return f"<div class='tb-status'>{t('ui.eval.status.none')}</div>"


@dataclasses.dataclass
class Session:
    """What one browser tab is looking at. Lives in gr.State, never in the server."""
    watch: Watch | None = None
    known: list = dataclasses.field(default_factory=list)   # folder names at the last tick
    page: int = 1
    compare_with: str | None = None
    results_sig: tuple | None = None
    preds_sig: tuple | None = None
    holding_message: bool = False   # a refusal stays until the user acts again
    # The message held, and the upload's note: (text, kind) and (id, params), kept unrendered
    # (a Msg, an error) so that a language switch redraws them.
    message: tuple | None = None
    upload_note: tuple | None = None


# --- numbers ---------------------------------------------------------------------------

def fmt_metric(name: str, value: Any) -> str:
    """A metric as the tables show it: loss to 4 places, perplexity to 2, tokens whole,
    the 0-100 scores to 1."""
    if value is None:
        return "–"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return html.escape(str(value))
    if not math.isfinite(value):
        return str(value)
    if name == "tokens":
        return f"{value:,.0f}"
    if name == "loss":
        return f"{value:.4f}"
    if name in ("perplexity", "accuracy_stderr"):
        return f"{value:.2f}"
    return f"{value:.1f}"


def difference(name: str, model: Any, base: Any) -> tuple[str, str]:
    """(text, css class) of model - base: tb-better, tb-worse or '' (no judgement)."""
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (model, base)):
        return "–", ""
    delta = model - base
    text = ("+" if delta > 0 else "−" if delta < 0 else "±") + fmt_metric(name, abs(delta))
    if name in NOT_COMPARED or delta == 0:
        return text, ""
    better = delta < 0 if name in LOWER_IS_BETTER else delta > 0
    return text, "tb-better" if better else "tb-worse"


def headline(results: dict | None) -> str:
    """The job in a few words: 'rouge_l 65.0 vs base 23.3' ('' when it has no results)."""
    if not results:
        return ""
    name = HEADLINE.get(results.get("task"), "")
    model, base = (results.get("model") or {}), (results.get("base") or {})
    if name not in model:
        name = next(iter(model), "")
    if not name:
        return ""
    if name in base:
        text = t("ui.eval.headline.vs_base", name=name, value=fmt_metric(name, model[name]),
                 base=fmt_metric(name, base[name]))
    else:
        text = t("ui.eval.headline", name=name, value=fmt_metric(name, model[name]))
    return t("ui.eval.headline.partial", text=text) if results.get("partial") else text


# --- results -------------------------------------------------------------------------

def _metric_cell(name: str) -> str:
    return (f"<td class='tb-metric' title='{html.escape(metric_help(name))}'>"
            f"{html.escape(name)}</td>")


def _side_names(results: dict) -> tuple[str, str]:
    first = "ui.eval.col.fine_tune" if results.get("adapter") else "ui.eval.col.model"
    return t(first), t("ui.eval.col.base")


def metrics_table(results: dict) -> str:
    """Rows: metrics; columns: fine-tune, base and their difference (the base columns only
    when the base was evaluated)."""
    model, base = results.get("model") or {}, results.get("base")
    first, second = _side_names(results)
    head = f"<th>{t('ui.eval.col.metric')}</th><th class='tb-num'>{first}</th>"
    if base is not None:
        head += (f"<th class='tb-num'>{second}</th>"
                 f"<th class='tb-num'>{t('ui.eval.col.difference')}</th>")
    rows = []
    for name in list(model) + [n for n in (base or {}) if n not in model]:
        cells = _metric_cell(name) + f"<td class='tb-num'>{fmt_metric(name, model.get(name))}</td>"
        if base is not None:
            text, kind = difference(name, model.get(name), base.get(name))
            cells += (f"<td class='tb-num'>{fmt_metric(name, base.get(name))}</td>"
                      f"<td class='tb-num {kind}'>{text}</td>")
        rows.append(f"<tr data-metric='{html.escape(name)}'>{cells}</tr>")
    return (f"<table class='tb-table' id='eval-metrics'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def tasks_table(results: dict) -> str:
    """Harness and choice jobs: accuracy per task, fine-tune beside base ('' otherwise)."""
    tasks = results.get("tasks") or {}
    if not tasks:
        return ""
    first, second = _side_names(results)
    rows = []
    for task, found in tasks.items():
        model, base = found.get("model") or {}, found.get("base") or {}
        acc, acc_base = model.get("accuracy"), base.get("accuracy")
        text, kind = difference("accuracy", acc, acc_base)
        rows.append(f"<tr data-task='{html.escape(task)}'><td>{html.escape(task)}</td>"
                    f"<td class='tb-num'>{fmt_metric('tokens', found.get('n'))}</td>"
                    f"<td class='tb-num'>{fmt_metric('accuracy', acc)}</td>"
                    f"<td class='tb-num'>{fmt_metric('accuracy', acc_base)}</td>"
                    f"<td class='tb-num {kind}'>{text}</td></tr>")
    return (f"<div class='tb-eval-sub'>{t('ui.eval.tasks.heading')}</div><table "
            f"class='tb-table' id='eval-tasks'><thead><tr><th>{t('ui.eval.col.task')}</th>"
            f"<th class='tb-num'>n</th><th class='tb-num'>{first}</th>"
            f"<th class='tb-num'>{second}</th><th class='tb-num'>{t('ui.eval.col.difference')}"
            f"</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def results_html(results: dict | None, status: dict | None = None) -> str:
    """results.json as the page shows it: what was measured, then the tables."""
    if not results:
        state = (status or {}).get("state")
        key = {"running": "running", "queued": "queued", "failed": "failed",
               None: "none"}.get(state, "empty")
        return (f"<div class='tb-eval-results tb-idle' data-state='{state or ''}'>"
                f"{t('ui.eval.results.' + key)}</div>")
    task = str(results.get("task", "?"))
    on = ", ".join(map(str, results.get("dataset") or [])) or ", ".join(results.get("tasks") or {})
    what = html.escape(str(results.get("model_name") or "?"))
    if results.get("adapter"):
        what += " + " + html.escape(_short_path(results["adapter"]))
    partial = (f"<span class='tb-badge tb-aborted'>{t('ui.eval.results.partial')}</span> "
               if results.get("partial") else "")
    elapsed = results.get("elapsed_s")
    head = (partial + t("ui.eval.results.on", task=f"<b>{html.escape(task)}</b>",
                        on=html.escape(on or '–'))
            + f" · n = {results.get('n', '?')} · {what}"
            + (" · " + t("ui.eval.results.seconds", s=f"{elapsed:.0f}")
               if isinstance(elapsed, (int, float)) else ""))
    return (f"<div class='tb-eval-results' data-task='{html.escape(task)}' "
            f"data-partial='{str(bool(results.get('partial'))).lower()}'>"
            f"<div class='tb-eval-head'>{head}</div>{metrics_table(results)}"
            f"{tasks_table(results)}</div>")


def _short_path(path: str) -> str:
    """A checkpoint as run/checkpoint, the way the pickers name it."""
    p = Path(str(path))
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


# --- predictions ---------------------------------------------------------------------

def count_lines(path: Path) -> int:
    """Complete lines in a file (a torn last line does not count), read in chunks."""
    n = 0
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                n += chunk.count(b"\n")
    except FileNotFoundError:
        return 0
    return n


def page_count(total: int, size: int = PAGE_SIZE) -> int:
    return max(1, math.ceil(total / size))


def _cell(text: Any, note: str = "") -> str:
    body = html.escape("" if text is None else str(text))
    extra = f"<div class='tb-dim'>{html.escape(note)}</div>" if note else ""
    return f"<td><div class='tb-cell'>{body}</div>{extra}</td>"


def _finish_note(row: dict, key: str) -> str:
    return t("ui.eval.preds.cut") if row.get(f"{key}_finish") == "length" else ""


def predictions_html(rows: list[dict], start: int, total: int, adapter: bool = True) -> str:
    """One page of predictions.jsonl: prompt, reference, each side's reply, ROUGE-L."""
    if not rows:
        return (f"<div class='tb-idle' id='eval-no-predictions'>{t('ui.eval.preds.none')}"
                "</div>" if total == 0 else "")
    base = any("base_prediction" in r for r in rows)
    scored = any(r.get("scores") for r in rows)
    first = t("ui.eval.col.fine_tuned_reply" if adapter else "ui.eval.col.reply")
    head = (f"<th>#</th><th>{t('ui.eval.col.prompt')}</th>"
            f"<th>{t('ui.eval.col.reference')}</th><th>{first}</th>")
    head += f"<th>{t('ui.eval.col.base_reply')}</th>" if base else ""
    if scored:
        head += "<th class='tb-num'>ROUGE-L</th>" + (
            f"<th class='tb-num'>{t('ui.eval.col.base')}</th>" if base else "")
    body = []
    for i, row in enumerate(rows, start=start + 1):
        turns = len(row.get("context") or [])
        cells = (f"<td class='tb-num'>{i}</td>"
                 + _cell(row.get("prompt"), t("ui.eval.preds.after", n=turns) if turns else "")
                 + _cell(row.get("reference") if row.get("reference") is not None else "–")
                 + _cell(row.get("prediction"), _finish_note(row, "prediction")))
        if base:
            cells += _cell(row.get("base_prediction"), _finish_note(row, "base_prediction"))
        if scored:
            cells += f"<td class='tb-num'>{_row_score(row, 'scores')}</td>"
            if base:
                cells += f"<td class='tb-num tb-dim'>{_row_score(row, 'base_scores')}</td>"
        body.append(f"<tr>{cells}</tr>")
    return (f"<table class='tb-table tb-preds'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


def _row_score(row: dict, key: str) -> str:
    return fmt_metric("rouge_l", (row.get(key) or {}).get("rouge_l"))


def predictions_page(folder: Path | None, page: int, size: int = PAGE_SIZE
                     ) -> tuple[str, int, str]:
    """(html, page shown, 'of N' text) for page `page` (1-based, clamped) of a job."""
    if folder is None:
        return "", 1, ""
    total = count_lines(Path(folder) / eval_tasks.PREDICTIONS)
    pages = page_count(total, size)
    page = min(max(1, int(page or 1)), pages)
    start = (page - 1) * size
    rows = evaluate.read_predictions(folder, start, size)
    adapter = bool(_job_config(Path(folder)).get("adapter"))
    info = (t("ui.eval.preds.info", pages=pages, first=start + 1, last=start + len(rows),
              total=total) if total else "")
    return predictions_html(rows, start, total, adapter), page, info


# --- job folders, read once per version ------------------------------------------------

_configs: dict[Path, tuple] = {}
_results: dict[Path, tuple] = {}


def _job_config(folder: Path) -> dict:
    """The job's config.yaml as a mapping ({} when unreadable), cached by its signature."""
    path = Path(folder) / runs.CONFIG
    sig = runs.file_signature(path)
    cached = _configs.get(path)
    if cached and cached[0] == sig:
        return cached[1]
    try:
        found = yaml.safe_load(path.read_text(encoding="utf-8")) if sig else {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        found = {}
    found = found if isinstance(found, dict) else {}
    _configs[path] = (sig, found)
    return found


def job_results(folder: Path) -> dict | None:
    """results.json, cached by its signature (None until the job writes it)."""
    path = Path(folder) / evaluate.RESULTS
    sig = runs.file_signature(path)
    cached = _results.get(path)
    if cached and cached[0] == sig:
        return cached[1]
    found = evaluate.read_results(folder) if sig else None
    _results[path] = (sig, found)
    return found


def job_task(folder: Path) -> str:
    return str(_job_config(folder).get("eval_task") or "?")


def job_on(folder: Path) -> str:
    """What the job read: its datasets, or its harness tasks."""
    config = _job_config(folder)
    if config.get("eval_task") == "harness":
        return ", ".join(map(str, config.get("harness_tasks") or [])) or "–"
    if config.get("eval_task") == "probes":
        return t("ui.eval.on.probes")
    return ", ".join(map(str, config.get("dataset") or [])) or "–"


def eval_jobs(saves: Path) -> list[runs.RunSummary]:
    """The eval jobs in the saves folder, newest first."""
    return [r for r in runs.list_runs(saves) if r.kind == evaluate.KIND]


def jobs_rows(saves: Path) -> list[list]:
    """Rows for the eval-jobs list: job, task, dataset, state, headline result, started."""
    return [[job.name, job_task(job.path), job_on(job.path),
             runs_view.state_label(job.path, job.state),
             headline(job_results(job.path)) or "–", _short_time(job.started_at) or "–"]
            for job in eval_jobs(saves)]


def newest_running_job(saves: Path) -> Path | None:
    """The eval job to reattach to when a page opens: the newest one still going."""
    busy = [r for r in launch.running_runs(saves)
            if r.path.resolve().parent == Path(saves).resolve() and evaluate.is_eval_job(r.path)]
    return max(busy, key=lambda r: r.started_at).path if busy else None


def find_job(saves: Path, name: str | None) -> Path | None:
    """The eval job folder listed under `name` (never a path outside the saves folder)."""
    if not name:
        return None
    path = runs.find_run(saves, str(name))
    return path if path is not None and evaluate.is_eval_job(path) else None


def evals_of_run(saves: Path, run_dir: Path | None) -> list[tuple[str, str]]:
    """(label, job name) for each eval job of a run's checkpoints, newest first: the Train
    tab's run view lists them, and picking one opens it in this tab."""
    if run_dir is None or evaluate.is_eval_job(run_dir):
        return []
    out = []
    for folder in evaluate.jobs_of_run(saves, run_dir):
        adapter = Path(str(_job_config(folder).get("adapter") or ""))
        result = headline(job_results(folder)) or runs_view.state_name(
            (runs.read_status_raw(folder) or {}).get("state", "?"))
        out.append((t("ui.eval.of_run", job=folder.name, task=job_task(folder),
                      checkpoint=adapter.name, on=job_on(folder), result=result), folder.name))
    return out


# --- comparing two jobs --------------------------------------------------------------

def comparable(a: dict, b: dict) -> str | None:
    """Why two jobs' results cannot sit side by side (None when they can)."""
    if a.get("task") != b.get("task"):
        return t("ui.eval.compare.tasks_differ", a=a.get("task"), b=b.get("task"))
    on_a, on_b = sorted(a.get("dataset") or []), sorted(b.get("dataset") or [])
    if a.get("task") == "harness":
        on_a, on_b = sorted(a.get("tasks") or {}), sorted(b.get("tasks") or {})
    if a.get("task") != "probes" and on_a != on_b:
        return t("ui.eval.compare.data_differ", a=", ".join(on_a) or "–",
                 b=", ".join(on_b) or "–")
    return None


def compare_html(first: Path | None, second: Path | None) -> str:
    """Two eval jobs' metrics side by side (fine-tune of each, and B − A), or why not."""
    if first is None or second is None:
        return f"<div class='tb-idle'>{t('ui.eval.compare.pick')}</div>"
    if Path(first).resolve() == Path(second).resolve():
        return f"<div class='tb-idle'>{t('ui.eval.compare.same')}</div>"
    a, b = job_results(first), job_results(second)
    missing = [f.name for f, r in ((first, a), (second, b)) if not r]
    if missing:
        return _note(t("ui.eval.compare.no_results", jobs=", ".join(missing)))
    why = comparable(a, b)
    if why:
        return _note(t("ui.eval.compare.refused", why=why))
    names = list(a.get("model") or {}) + [n for n in b.get("model") or {}
                                          if n not in (a.get("model") or {})]
    rows = []
    for name in names:
        x, y = (a.get("model") or {}).get(name), (b.get("model") or {}).get(name)
        text, kind = difference(name, y, x)
        rows.append(f"<tr data-metric='{html.escape(name)}'>{_metric_cell(name)}"
                    f"<td class='tb-num'>{fmt_metric(name, x)}</td>"
                    f"<td class='tb-num'>{fmt_metric(name, y)}</td>"
                    f"<td class='tb-num {kind}'>{text}</td></tr>")
    notes = ""
    if a.get("n") != b.get("n"):
        differ = t("ui.eval.compare.rows_differ", a=a.get("n"), b=b.get("n"))
        notes = f"<div class='tb-note'>{differ}</div>"
    return (f"<div id='eval-compare-table'><div class='tb-eval-head'>A = <b>"
            f"{html.escape(first.name)}</b> ({html.escape(_what(a))}) · B = <b>"
            f"{html.escape(second.name)}</b> ({html.escape(_what(b))})</div>"
            f"<table class='tb-table'><thead><tr><th>{t('ui.eval.col.metric')}</th>"
            f"<th class='tb-num'>A</th><th class='tb-num'>B</th><th class='tb-num'>B − A</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>{notes}</div>")


def _what(results: dict) -> str:
    adapter = results.get("adapter")
    return str(results.get("model_name") or "?") + (f" + {_short_path(adapter)}" if adapter
                                                      else "")


def _note(text: str) -> str:
    return f"<pre class='tb-note' id='eval-compare-note'>{html.escape(text)}</pre>"


# --- the form: choices that follow the task and the checkpoint -----------------------

# What each registered dataset holds, for the registry file as it was when asked:
# {(folder, signature of dataset_info.json): {name: kind}}.
_kinds: dict[tuple, dict[str, str | None]] = {}


def dataset_kinds(dataset_dir: str) -> dict[str, str | None]:
    """Each registered dataset's kind, asked of the data worker once per registry version."""
    try:
        folder = data.data_dir(dataset_dir or "data")
        key = (str(folder), runs.file_signature(folder / data.REGISTRY))
        if key not in _kinds:
            found = data_worker.dataset_kinds(dataset_dir or "data")
            _kinds.clear()
            _kinds[key] = found
        return dict(_kinds[key])
    except BadInput:
        return {}  # a broken registry is reported when a job reads it


def datasets_for_task(task: str, kinds: dict[str, str | None]) -> list[str]:
    return [name for name, kind in kinds.items() if kind in TASK_KINDS.get(task, ())]


def fit_datasets(task: str, kinds: dict[str, str | None], current: list[str] | None
                 ) -> tuple[list[str], list[str]]:
    """(choices, selection) for the dataset picker under `task`: registered datasets the
    task cannot read leave the selection (the first that fits takes their place when
    none is left); a typed file path stays, for Start's check to judge."""
    fits = datasets_for_task(task, kinds)
    current = [str(d) for d in current or []]
    keep = [d for d in current if d in fits or d not in kinds]
    if not keep and fits and TASK_KINDS.get(task):
        keep = [fits[0]]
    return sorted(set(fits) | set(keep)), keep


def task_for_kind(kind: str | None, current: str) -> str:
    """The task to evaluate a dataset of `kind` with: the current one when it reads it."""
    if kind in TASK_KINDS.get(current, ()):
        return current
    return next((task for task, kinds in TASK_KINDS.items() if kind in kinds), current)


def checkpoint_choices(saves: Path) -> list[tuple[str, str]]:
    """(label, path): the model alone, then every final/ and checkpoint-N/, newest run first."""
    return [(t("ui.eval.no_checkpoint"), "")] + [(f"{p.parent.name}/{p.name}", str(p))
                                                 for p in runs.loadable_checkpoints(saves)]


def from_run(checkpoint: str | None) -> dict:
    """The settings an eval of this checkpoint takes from its run (cfg.EVAL_FROM_RUN):
    model, template, identity, length. {} for no checkpoint, or one outside the allowed
    folders (nothing is read there)."""
    if not (checkpoint or "").strip():
        return {}
    try:
        folder = paths.confine(checkpoint, "checkpoint", must_exist=True)
    except BadInput:
        return {}
    trained = models.run_config(folder)
    return {k: trained[k] for k in cfg.EVAL_FROM_RUN if k in trained}


# --- layout ----------------------------------------------------------------------------

def _picker(f: dataclasses.Field, choices: list | Callable[[], list], value: Any,
            **extra) -> gr.Dropdown:
    """A dropdown for one setting, with its label and help from the schema (the label
    from LABELS where this tab names it otherwise). Choices given as a function are
    asked again on a language switch (their display texts are translated)."""
    label = LABELS.get(f.name, f"field.eval.{f.name}.label")
    texts = dict(label=label, info=lambda: form.info(f, cfg.EvalConfig))
    if callable(choices):
        texts["choices"], choices = choices, choices()
    return tr(gr.Dropdown(choices=choices, value=value, info=form.info(f, cfg.EvalConfig),
                          label=t(label),
                          elem_id=SPEC_IDS.get(f.name, form.elem_id(f.name, "eval")), **extra),
              **texts)


def _rows(fields: list[dataclasses.Field], values: dict, datasets: list[str], task: str,
          widgets: dict) -> None:
    """Generic widgets in rows of at most form.PER_ROW, split evenly (6 make 3 and 3), each
    shown when its task reads it."""
    for chunk in form.even_rows(fields):
        with gr.Row(equal_height=False):
            for f in chunk:
                widgets[f.name] = form.make_widget(
                    f, values[f.name], datasets, cfg.EvalConfig, "eval",
                    visible=task in FOR_TASKS.get(f.name, (task,)))


def build_eval_form(config: cfg.EvalConfig, saves: Path, kinds: dict) -> form.Form:
    """The Evaluate form, from cfg.EvalConfig: the pickers, then the dataset (or harness
    tasks), then every other setting; advanced ones and generation folded away."""
    values, fields = schema.to_dict(config), schema.fields(cfg.EvalConfig)
    datasets, chosen = fit_datasets(config.eval_task, kinds, config.dataset)
    values["dataset"] = chosen
    widgets: dict[str, gr.Component] = {}
    with gr.Row(equal_height=False):
        widgets["model"] = _picker(fields["model"], model_choices(saves), values["model"],
                                   allow_custom_value=True, scale=2)
        widgets["adapter"] = _picker(fields["adapter"], lambda: checkpoint_choices(saves), "",
                                     allow_custom_value=True, scale=3)
        widgets["eval_task"] = _picker(fields["eval_task"], list(cfg.EVAL_TASKS),
                                       values["eval_task"], scale=2)
    _rows([fields[n] for n in WHAT_ON], values, datasets, config.eval_task, widgets)
    placed = set(PICKERS + WHAT_ON + NOT_IN_FORM)
    rest = [f for f in fields.values() if f.name not in placed]
    _rows([f for f in rest if not f.metadata["advanced"] and f.metadata["group"] != "generation"],
          values, datasets, config.eval_task, widgets)
    with widget(gr.Accordion, {"label": "ui.eval.generation"}, open=False,
                elem_id="eval-generation"):
        _rows([f for f in rest if f.metadata["group"] == "generation"], values, datasets,
              config.eval_task, widgets)
    with widget(gr.Accordion, {"label": "ui.eval.advanced"}, open=False, elem_id="eval-advanced"):
        _rows([f for f in rest if f.metadata["advanced"] and f.metadata["group"] != "generation"],
              values, datasets, config.eval_task, widgets)
    return form.Form({n: widgets[n] for n in fields if n in widgets})


def config_of(names: list[str], values: list[Any]) -> cfg.EvalConfig:
    """Widget values -> a validated EvalConfig (BadInput lists every problem)."""
    raw = {n: v for n, v in zip(names, values)}
    if raw.get("adapter") is None:
        raw["adapter"] = ""
    return cfg.eval_config(raw, "the form")


# --- the tab -------------------------------------------------------------------------

class EvalTab:
    """Builds the tab inside the current gr.Tab and wires its events."""

    def __init__(self, saves: Path, dataset_dir: str = "data"):
        self.saves = Path(saves)
        defaults = cfg.EvalConfig()
        self.session = gr.State(_new_session)   # a fresh Session per browser tab
        self.form = build_eval_form(defaults, self.saves, dataset_kinds(dataset_dir))
        self._upload_panel()
        with gr.Row():
            self.start = widget(gr.Button, {"value": "ui.eval.start"}, variant="primary",
                                elem_id="eval-start")
            self.abort = widget(gr.Button, {"value": "ui.eval.stop"}, variant="stop",
                                elem_id="eval-abort")
        self._monitor()
        self._jobs_panel()
        self.timer = gr.Timer(TICK_S)
        self._wire()

    def _upload_panel(self):
        with widget(gr.Accordion, {"label": "ui.eval.upload"}, open=False, elem_id="eval-data"):
            with gr.Row():
                self.upload_name = widget(gr.Textbox,
                                          {"label": "ui.eval.upload.name",
                                           "info": "ui.eval.upload.name.info"},
                                          max_lines=1, elem_id="eval-upload-name")
                self.upload = widget(gr.File, {"label": "ui.eval.upload.file"},
                                     file_types=[".csv", ".json", ".jsonl"], elem_id="eval-upload",
                                     scale=2, height=150)
            self.upload_status = gr.Markdown(elem_id="eval-upload-status")

    def _monitor(self):
        bare = dict(apply_default_css=False, js_on_load=None)
        with gr.Column(elem_classes="tb-tight"):
            self.status = gr.HTML(no_job(), elem_id="eval-status", **bare)
            self.progress = gr.HTML(_progress(None), elem_id="eval-progress", **bare)
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                self.results = gr.HTML(results_html(None), elem_id="eval-results", **bare)
            with gr.Column(scale=2):
                self.log = gr.HTML(log_html("", evaluate.LOG), elem_id="eval-log", **bare)
        with widget(gr.Accordion, {"label": "ui.eval.preds"}, open=True, visible=False,
                    elem_id="eval-predictions-box") as self.preds_box:
            with gr.Row(equal_height=True):
                self.prev = widget(gr.Button, {"value": "ui.eval.prev"}, size="sm",
                                   elem_id="eval-prev", scale=0, min_width=110)
                self.page = widget(gr.Number, {"label": "ui.eval.page"}, 1, precision=0, minimum=1,
                                   scale=0, min_width=90, elem_id="eval-page", show_label=False)
                self.page_info = gr.Markdown("", elem_id="eval-page-info")
                self.next = widget(gr.Button, {"value": "ui.eval.next"}, size="sm",
                                   elem_id="eval-next", scale=0, min_width=110)
            self.predictions = gr.HTML("", elem_id="eval-predictions", **bare)

    def _jobs_panel(self):
        with gr.Row(equal_height=False):
            self.job_pick = widget(gr.Dropdown, {"label": "ui.eval.job"}, choices=[], value=None,
                                   elem_id="eval-job", scale=3)
            self.compare_pick = widget(gr.Dropdown,
                                       {"label": "ui.eval.compare_with",
                                        "info": "ui.eval.compare_with.info"},
                                       choices=[], value=None, elem_id="eval-compare-with",
                                       scale=3)
            self.refresh = widget(gr.Button, {"value": "ui.eval.refresh"}, size="sm",
                                  elem_id="eval-refresh", scale=0, min_width=90)
        self.compare = gr.HTML(compare_html(None, None), elem_id="eval-compare",
                               apply_default_css=False, js_on_load=None)
        self.jobs = widget(gr.Dataframe, {"headers": job_headers, "label": "ui.eval.jobs"},
                           value=[], interactive=False, elem_id="eval-jobs", max_height=280,
                           wrap=True)

    # --- wiring --------------------------------------------------------------------------

    @property
    def view_outputs(self) -> list:
        """What drawing a job updates (`_render`, `tick`), in this order."""
        return [self.status, self.progress, self.log, self.results, self.predictions,
                self.page, self.page_info, self.compare, self.preds_box]

    @property
    def listing_outputs(self) -> list:
        return [self.jobs, self.job_pick, self.compare_pick]

    def _wire(self):
        view, listing = self.view_outputs, self.listing_outputs
        quiet = dict(show_progress="hidden")
        widgets, w = self.form.components, self.form.widgets
        self.timer.tick(self.tick, [self.session], view + listing, concurrency_limit=None,
                        api_visibility="private", **quiet)
        self.start.click(self.on_start, [self.session] + widgets, view + listing)
        self.abort.click(self.on_abort, [self.session], view + listing, concurrency_limit=None)
        self.job_pick.input(self.on_pick, [self.session, self.job_pick], view + listing)
        self.jobs.select(self.on_select, [self.session], view + listing)
        self.refresh.click(self.on_refresh, [self.session], listing)
        self.compare_pick.input(self.on_compare, [self.session, self.compare_pick], [self.compare])
        pager = [self.predictions, self.page, self.page_info]
        self.prev.click(self.on_page, [self.session, gr.State(-1)], pager, **quiet)
        self.next.click(self.on_page, [self.session, gr.State(1)], pager, **quiet)
        gr.on([self.page.submit, self.page.blur], self.on_page_number,
              [self.session, self.page], pager, **quiet)
        task_bound = [n for n in FOR_TASKS if n in w]
        w["eval_task"].change(self.on_task, [w["eval_task"], w["dataset_dir"], w["dataset"]],
                              [w[n] for n in task_bound], api_visibility="private", **quiet)
        self.prefilled = [n for n in cfg.EVAL_FROM_RUN if n in w]
        w["adapter"].change(self.on_checkpoint, [w["adapter"]], [w[n] for n in self.prefilled],
                            **quiet)
        self.upload.upload(self.on_upload, [self.upload, self.upload_name, w["dataset_dir"],
                                            w["dataset"], w["eval_task"], self.session],
                           [w["eval_task"], w["dataset"], self.upload_status])
        redraw(self.relabel, [self.session],
               self.view_outputs + [self.jobs, self.upload_status])
        tab = gr.context.Context.block  # the gr.Tab app.py opened: refresh lists on opening it
        if hasattr(tab, "select"):
            tab.select(self.on_tab, [w["eval_task"], w["dataset_dir"], w["dataset"]],
                       [w["model"], w["adapter"], w["dataset"]], api_visibility="private",
                       **quiet)

    def wire_page_load(self, demo: gr.Blocks) -> None:
        """Reattach when a page opens: the running eval job, else the newest one."""
        w = self.form.widgets
        demo.load(self.on_load, [self.session], self.view_outputs + self.listing_outputs,
                  api_visibility="private")
        # The pickers as the saves folder is now (the page was built when the server started).
        demo.load(self.on_tab, [w["eval_task"], w["dataset_dir"], w["dataset"]],
                  [w["model"], w["adapter"], w["dataset"]],
                  api_visibility="private", show_progress="hidden")

    def wire_open_from(self, picker: gr.Component, tabs: gr.Tabs, tab_id: str) -> None:
        """Picking a job in `picker` (the Train tab's evaluations of a run) shows it here and
        switches to this tab."""
        def on_open(session: Session, name: str | None) -> list:
            # The picker is cleared, so that picking the same job again opens it again.
            return self.on_pick(session, name) + [gr.update(value=None),
                                                  gr.Tabs(selected=tab_id)]

        picker.input(on_open, [self.session, picker],
                     self.view_outputs + self.listing_outputs + [picker, tabs],
                     api_visibility="private")

    # --- drawing -------------------------------------------------------------------------

    def _render(self, session: Session, folder: Path | None) -> list:
        """Every view output, drawn in full (a tab switches to another job)."""
        if session.watch is None or folder is None or session.watch.run_dir != folder:
            session.page = 1
        session.watch = Watch(folder) if folder else None
        session.holding_message, session.message = False, None
        if folder is not None:
            session.watch.poll()
            session.results_sig = runs.file_signature(folder / evaluate.RESULTS)
            session.preds_sig = runs.file_signature(folder / eval_tasks.PREDICTIONS)
        return self._draw(session)

    def _draw(self, session: Session) -> list:
        """Every view output from what the session last read, in the current language: a
        job drawn anew, or the same job after a language switch (a held message stays)."""
        watch = session.watch
        if watch is None:
            return [self._held(session) or no_job(), _progress(None), log_html("", evaluate.LOG),
                    results_html(None), "", 1, "", self._compare(session),
                    gr.update(visible=False)]
        folder = watch.run_dir
        table, page, info = predictions_page(folder, session.page)
        session.page = page
        return [self._held(session) or status_html(folder, watch.status),
                _progress(watch.status, watch.records),
                log_html(launch.log_tail(runs.log_path(folder)), evaluate.LOG),
                results_html(job_results(folder), watch.status), table, page, info,
                self._compare(session), gr.update(visible=job_task(folder) in WRITES_PREDICTIONS)]

    def _held(self, session: Session) -> str | None:
        """The message the status line holds (a refusal, "checking…"), rendered now."""
        if not (session.holding_message and session.message):
            return None
        text, kind = session.message
        return message_html(text_of(text), kind=kind)

    def relabel(self, session: Session) -> list:
        """A language switch: the view, the jobs list and the upload note, redrawn."""
        return self._draw(session) + [_table(jobs_rows(self.saves)),
                                      _upload_text(session.upload_note)]

    def _compare(self, session: Session) -> str:
        shown = session.watch.run_dir if session.watch else None
        return compare_html(shown, find_job(self.saves, session.compare_with))

    def _listing(self, session: Session) -> list:
        """The jobs list, and the job and compare pickers' choices."""
        session.known = [p.name for p in runs.run_dirs(self.saves)]
        rows = jobs_rows(self.saves)
        names = [r[0] for r in rows]
        shown = session.watch.run_dir.name if session.watch else None
        return [_table(rows), gr.update(choices=names, value=shown) if shown
                else gr.update(choices=names),
                gr.update(choices=[n for n in names if n != shown], value=session.compare_with)]

    def tick(self, session: Session) -> list:
        """Once a second per tab: read only what changed; skip what did not."""
        n_view = len(self.view_outputs)
        out = [gr.skip()] * (n_view + len(self.listing_outputs))
        names = [p.name for p in runs.run_dirs(self.saves)]
        new_folder = names != session.known
        watch = session.watch
        if new_folder and not _is_running(watch):
            # An eval job started elsewhere (another tab, the CLI): follow it.
            path = newest_running_job(self.saves)
            if path is not None and (watch is None or path != watch.run_dir):
                return self._render(session, path) + self._listing(session)
        if watch is None:
            return out[:n_view] + self._listing(session) if new_folder else out
        changes = watch.poll()
        if session.watch is not watch:
            return [gr.skip()] * len(out)  # the tab switched jobs while this tick read
        folder = watch.run_dir
        if changes.status is not None and not session.holding_message:
            out[0] = status_html(folder, watch.status)
        if changes.status is not None or changes.metrics is not None:
            out[1] = _progress(watch.status, watch.records)
        if changes.log is not None:
            out[2] = log_html(changes.log, evaluate.LOG)
        results_sig = runs.file_signature(folder / evaluate.RESULTS)
        if results_sig != session.results_sig or changes.status is not None:
            session.results_sig = results_sig
            out[3] = results_html(job_results(folder), watch.status)
            out[7] = self._compare(session)
        preds_sig = runs.file_signature(folder / eval_tasks.PREDICTIONS)
        if preds_sig != session.preds_sig:
            session.preds_sig = preds_sig
            out[4], out[5], out[6] = predictions_page(folder, session.page)
        if new_folder or changes.status is not None:
            out[n_view:] = self._listing(session)
        return out

    # --- handlers ------------------------------------------------------------------------

    def _message(self, session: Session, text: Any, kind: str = "error") -> list:
        """Hold `text` (a Msg or an error, kept unrendered for a language switch) in the
        status line."""
        session.holding_message, session.message = True, (text, kind)
        return [self._held(session)] + \
            [gr.skip()] * (len(self.view_outputs) + len(self.listing_outputs) - 1)

    def on_start(self, session: Session, *values):
        """Check everything (the settings here, the data and checkpoint in a child), then
        launch; on bad input show why and create nothing."""
        try:
            config = config_of(self.form.names, list(values))
            paths.confine_config(config, self.saves)
        except BadInput as err:
            yield self._message(session, err)
            return
        yield self._message(session, msg("ui.eval.checking"), kind="checking")
        try:
            data_worker.eval_check(config)
            folder = launch.start_eval(config, self.saves, queue=True)  # busy: queued
        except BadInput as err:
            yield self._message(session, err)
            return
        session.compare_with = None
        yield self._render(session, folder) + self._listing(session)

    def on_abort(self, session: Session) -> list:
        """Stop the job shown: a running one is aborted, a queued one leaves the queue."""
        watch = session.watch
        state = (watch.status or {}).get("state") if watch else None
        if state not in ("running", "queued"):
            return self._message(session, msg("ui.eval.nothing_to_stop"), kind="note")
        try:
            launch.stop_job(watch.run_dir, self.saves)
        except BadInput as err:
            return self._message(session, err)
        return self._render(session, watch.run_dir) + self._listing(session)

    def on_pick(self, session: Session, name: str | None) -> list:
        folder = find_job(self.saves, name)
        if name and folder is None:
            return self._message(session, msg("ui.eval.not_a_job", name=repr(name)))
        if folder is not None and session.compare_with == folder.name:
            session.compare_with = None
        return self._render(session, folder) + self._listing(session)

    def on_select(self, session: Session, evt: gr.SelectData) -> list:
        row = evt.row_value or []
        return self.on_pick(session, str(row[0]) if row else None)

    def on_refresh(self, session: Session) -> list:
        return self._listing(session)

    def on_compare(self, session: Session, name: str | None) -> str:
        session.compare_with = name or None
        return self._compare(session)

    def on_load(self, session: Session) -> list:
        """A page (re)opens: the running eval job, else the newest one."""
        folder = newest_running_job(self.saves)
        if folder is None:
            jobs = eval_jobs(self.saves)
            folder = jobs[0].path if jobs else None
        return self._render(session, folder) + self._listing(session)

    def on_page(self, session: Session, step: int) -> list:
        return self._page(session, session.page + step)

    def on_page_number(self, session: Session, page: float | None) -> list:
        return self._page(session, int(page or 1))

    def _page(self, session: Session, page: int) -> list:
        folder = session.watch.run_dir if session.watch else None
        table, session.page, info = predictions_page(folder, page)
        return [table, session.page, info]

    def on_task(self, task: str, dataset_dir: str, current: list[str] | None) -> list:
        """Another task: show the settings it reads; the datasets offered are those it reads."""
        out = []
        for name in FOR_TASKS:
            if name not in self.form.widgets:
                continue
            show = task in FOR_TASKS[name]
            if name == "dataset":
                choices, chosen = fit_datasets(task, dataset_kinds(dataset_dir), current)
                out.append(gr.update(visible=show, choices=choices, value=chosen))
            else:
                out.append(gr.update(visible=show))
        return out

    def on_checkpoint(self, checkpoint: str | None) -> list:
        """A checkpoint of a run was picked: its run's model, template, identity and length
        fill the form (what the rows were trained with), as `tunebench eval` does."""
        trained = from_run(checkpoint)
        return [form.widget_value(n, trained[n], cfg.EvalConfig) if n in trained else gr.skip()
                for n in self.prefilled]

    def on_tab(self, task: str, dataset_dir: str, current: list[str] | None):
        """The tab opens: new exports, checkpoints and datasets appear in the pickers. Only
        the choices change: a value picked while this was on its way stays picked."""
        choices, _ = fit_datasets(task, dataset_kinds(dataset_dir), current)
        return (gr.update(choices=model_choices(self.saves)),
                gr.update(choices=checkpoint_choices(self.saves)), gr.update(choices=choices))

    def on_upload(self, file: str | None, name: str, dataset_dir: str,
                  current: list[str] | None, task: str, session: Session | None = None):
        """Validate and register the file (in the data worker); select it, with the task
        that reads its kind of data. The note is kept in `session` for a language switch."""
        if not file:
            return gr.skip(), gr.skip(), ""
        task, picked, note = self._register(file, name, dataset_dir, current, task)
        if session is not None:
            session.upload_note = note
        return task, picked, _upload_text(note)

    def _register(self, file: str, name: str, dataset_dir: str, current: list[str] | None,
                  task: str) -> tuple:
        """(task, dataset picker update, note as (id, params))."""
        try:
            from core import limits
            dataset_dir = dataset_dir or "data"
            paths.confine(dataset_dir, "dataset_dir")  # where the upload will be written
            name = limits.check_text(name or "", "register as", limits.MAX_NAME_CHARS).strip()
            key = data_worker.register(file, dataset_dir, name or None)
        except BadInput as err:
            return gr.skip(), gr.skip(), ("ui.eval.upload.refused", {"error": err})
        kinds = dataset_kinds(dataset_dir)
        kind = kinds.get(key)
        new_task = task_for_kind(kind, task)
        where = dict(name=key, kind=kind, folder=dataset_dir)
        if kind not in TASK_KINDS.get(new_task, ()):
            return gr.skip(), gr.skip(), ("ui.eval.upload.unread", where)
        keep = [d for d in current or [] if new_task == task and d != key]
        choices, _ = fit_datasets(new_task, kinds, keep + [key])
        moved = msg("ui.eval.upload.moved", task=new_task) if new_task != task else ""
        return (new_task, gr.update(choices=choices, value=keep + [key]),
                ("ui.eval.upload.done", {**where, "moved": moved}))


def _progress(status: dict | None, records: list[dict] | None = None) -> str:
    if status is None:
        return f"<div class='tb-progress tb-idle'>{t('ui.eval.progress.none')}</div>"
    return progress_html(status, records or [])


def _upload_text(note: tuple | None) -> str:
    """The upload's note (id, params) in the current language; an error parameter is shown
    as its text."""
    if note is None:
        return ""
    key, params = note
    return t(key, **{k: text_of(v) for k, v in params.items()})


def _new_session() -> Session:
    return Session()


def _is_running(watch: Watch | None) -> bool:
    return bool(watch and watch.status and watch.status.get("state") == "running")


def job_headers() -> list[str]:
    """The jobs list's column headers in the current language (JOB_COLUMNS are their ids)."""
    return [t(f"ui.eval.col.{c}") for c in JOB_COLUMNS]


def _table(rows: list[list]):
    import pandas as pd
    return pd.DataFrame(rows, columns=job_headers())
