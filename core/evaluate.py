"""`tunebench eval`: one evaluation job, written to a job folder the way a run is.

Reads top to bottom: resolve the settings (an eval of a run's checkpoint takes the run's
template, placeholders and model unless told otherwise), check every input before any
folder exists, create the job folder, load the model with its checkpoint once, then run
the task on each side (the checkpoint, and the base when `compare_base`), and write
results.json. The page's Evaluate tab starts exactly this command (core/launch.py) and
then only reads the folder back:

    config.yaml        the resolved EvalConfig, rerunnable with `tunebench eval`
    command.txt        the command line started
    status.json        state, pid, times, error; "kind": "eval" tells it from a run
    eval.log           the job's stdout and stderr
    metrics.jsonl      progress: step, total_steps, elapsed_s, eta_s, side
    results.json       {"task", "n", "model": {metric: value}, "base": {...} | null, ...}
    predictions.jsonl  predict and probes: one object per prompt, written as produced
    probes.json        probes: the Chat tab's probe table

Tasks are rows of one table (TASKS): each checks its inputs, then measures one side.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import shlex
import signal
import sys
import time
import traceback
from pathlib import Path

from . import config as cfg
from . import jobs, models, paths, runs, schema
from .errors import BadInput
from .eval_tasks import PREDICTIONS, TASKS, Inputs, Job
from .i18n import Msg, msg, t, text_of

LOG = runs.EVAL_LOG
RESULTS = "results.json"
KIND = "eval"


# --- settings ------------------------------------------------------------------------

def resolve(config_path: str | None, overrides: list[str]) -> cfg.EvalConfig:
    """The job's settings: schema defaults, then (for a run's checkpoint) the run's own
    model, template, placeholders and length, then the YAML file, then KEY=VALUE."""
    raw = schema.read_yaml(config_path) if config_path else {}
    source = config_path or "the command line"
    raw.update(schema.parse_overrides(overrides))
    adapter = raw.get("adapter")
    if adapter and isinstance(adapter, str):
        trained = models.run_config(Path(adapter).expanduser())
        for key in cfg.EVAL_FROM_RUN:
            if key not in raw and key in trained:
                raw[key] = trained[key]
    return cfg.eval_config(raw, source)


# --- inputs: everything checked before a folder exists --------------------------------

def check(config: cfg.EvalConfig) -> Inputs:
    """Every bad input of this job, as BadInput naming file, record and field."""
    if config.adapter:
        _check_checkpoint(config)
    # Without a checkpoint the model is checked as it loads: resolving 'demo' here would
    # build it inside the page's pre-check, where a first build would hold up the page.
    return TASKS[config.eval_task].check(config)


def _check_checkpoint(config: cfg.EvalConfig) -> None:
    ckpt = paths.guard(config.adapter, "adapter").resolve()
    if models.is_reward_model(ckpt):
        raise BadInput(models.reward_model_refusal("checkpoint"), file=str(ckpt),
                       field="adapter")
    if models.checkpoint_kind(ckpt) == "adapter":
        base = models.resolve_model(config.model)
        models.check_adapter_fits(base, models.load_config(base, config.trust_remote_code),
                                  ckpt, config.trust_remote_code, head="causal")


# --- the job folder ------------------------------------------------------------------

def job_dir_for(config: cfg.EvalConfig, saves_dir: str | Path = "saves") -> Path:
    """output_dir when set, else saves/eval-<task>-<date>-<time> (-2, -3 for the same second)."""
    if config.output_dir:
        return Path(config.output_dir).expanduser().resolve()
    name = f"eval-{config.eval_task}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    folder, n = Path(saves_dir) / name, 2
    while folder.exists():
        folder, n = Path(saves_dir) / f"{name}-{n}", n + 1
    return folder.resolve()


def prepare_job_dir(config: cfg.EvalConfig, argv: list[str]) -> tuple[cfg.EvalConfig, Path]:
    """Create the job folder with config.yaml and command.txt (nothing else yet)."""
    folder = job_dir_for(config)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        config = dataclasses.replace(config, output_dir=str(folder))
        runs.write_atomic(folder / runs.CONFIG, schema.to_yaml(config))
        runs.write_atomic(folder / runs.COMMAND, shlex.join(argv) + "\n")
    except OSError as err:
        raise BadInput(msg("eval.cannot_write", reason=str(err.strerror)), file=str(folder),
                       field="output_dir") from None
    return config, folder


def is_eval_job(folder: Path) -> bool:
    status = runs.read_status_raw(folder) or {}
    return status.get("kind") == KIND


def read_results(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / RESULTS).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def read_predictions(folder: Path, start: int = 0, count: int | None = None) -> list[dict]:
    """Rows `start` .. `start + count` of predictions.jsonl (a torn last line is skipped)."""
    rows = []
    try:
        with open(Path(folder) / PREDICTIONS, encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if i < start:
                    continue
                if count is not None and len(rows) >= count:
                    break
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break
    except FileNotFoundError:
        pass
    return rows


def jobs_of_run(saves_dir: Path, run_dir: Path) -> list[Path]:
    """The eval jobs under `saves_dir` whose checkpoint lies in `run_dir`, newest first."""
    run_dir = Path(run_dir).resolve()
    found = []
    for folder in runs.run_dirs(Path(saves_dir)):
        if not is_eval_job(folder):
            continue
        adapter = str(models.run_config(folder / "config.yaml").get("adapter") or "")
        if adapter and (run_dir == Path(adapter).resolve() or
                        run_dir in Path(adapter).resolve().parents):
            found.append(folder)
    return sorted(found, key=lambda p: p.name, reverse=True)


# --- progress and stopping -----------------------------------------------------------

UNITS = ("batches", "replies", "tasks")  # what the tasks count, each with a catalogue text


class Progress:
    """Appends a progress line per step to metrics.jsonl (the page draws the bar and the
    ETA from it, as for a run) and prints one to eval.log."""

    def __init__(self, folder: Path, total: int, unit: str):
        self.folder, self.total, self.unit = folder, max(total, 1), unit
        self.done, self.started = 0, time.monotonic()

    def advance(self, n: int, side: str) -> None:
        self.done = min(self.done + n, self.total)
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else None
        runs.append_metrics(self.folder, {
            "step": self.done, "total_steps": self.total, "unit": self.unit, "epoch": None,
            "elapsed_s": round(elapsed, 2), "eta_s": round(eta, 1) if eta is not None else None,
            "side": side})
        left = msg("eval.progress.eta", eta=eta) if eta is not None else ""
        unit = msg(f"eval.unit.{self.unit}") if self.unit in UNITS else self.unit
        print(t("eval.progress", unit=unit, done=self.done, total=self.total,
                percent=100 * self.done / self.total, rate=rate, left=left, side=side),
              flush=True)


class Stop:
    """SIGTERM/SIGINT ask the job to stop after the batch in hand; what is done is kept.
    A context manager: the previous handlers come back when the job ends."""

    def __init__(self):
        self.requested = False
        self._saved = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.requested = True
        print(t("eval.stopping", signal=signal.Signals(signum).name), flush=True)


# --- the command ---------------------------------------------------------------------

def main(config_path: str | None, overrides: list[str]) -> int:
    """`tunebench eval`: check, create the job folder, evaluate, write results.json."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see core/train.py
    config = resolve(config_path, overrides)
    if paths.confined():  # started by the page: every path passes the gate again
        paths.confine_config(config)
    launched = _launched_here(config, config_path)
    if not launched and config.output_dir and _holds_job(Path(config.output_dir)):
        if _own_config(config, config_path):  # a finished job's config.yaml, run again
            config = dataclasses.replace(config, output_dir="")
        else:
            raise BadInput(msg("eval.folder_taken"), file=config.output_dir, field="output_dir")
    try:
        inputs = check(config)
    except BadInput as err:
        if launched:  # the page made the folder: the error goes where the page reads
            runs.write_status(Path(config.output_dir), "failed", exit_code=2, kind=KIND,
                              **_error(err))
        raise
    if launched:
        folder = Path(config.output_dir)
    else:
        config, folder = prepare_job_dir(config, runs.started_as() + sys.argv[1:])
    with runs.TeeLog(folder / LOG), jobs.own_pid_entry(folder):
        return run(config, folder, inputs)


def _own_config(config: cfg.EvalConfig, config_path: str | None) -> bool:
    return bool(config.output_dir) and config_path is not None and \
        Path(config_path).resolve() == Path(config.output_dir).resolve() / runs.CONFIG


def _holds_job(folder: Path) -> bool:
    return any((folder / name).exists() for name in (RESULTS, runs.METRICS, PREDICTIONS))


def _launched_here(config: cfg.EvalConfig, config_path: str | None) -> bool:
    """Whether the launcher prepared this folder for this very start (its config.yaml,
    nothing measured yet): then the job runs in it, rather than in a new one."""
    return _own_config(config, config_path) and not _holds_job(Path(config.output_dir))


def run(config: cfg.EvalConfig, folder: Path, inputs: Inputs) -> int:
    """Load once, measure each side, write results.json; status.json records the end."""
    from .train import quiet_library_noise
    quiet_library_noise()
    runs.write_status(folder, "running", pid=os.getpid(), kind=KIND,
                      **_phase(msg("eval.phase.loading")))
    started = time.monotonic()
    with Stop() as stop:
        return _run(config, folder, inputs, stop, started)


def _run(config: cfg.EvalConfig, folder: Path, inputs: Inputs, stop: Stop,
         started: float) -> int:
    try:
        job = Job(config, folder, _load(config), inputs, _sides(config), stop,
                  lambda total, unit: Progress(folder, total, unit))
        runs.update_status(folder, **_phase(TASKS[config.eval_task].what))
        results = TASKS[config.eval_task].run(job)
        results.update(_provenance(config, started, partial=stop.requested))
        runs.write_atomic(folder / RESULTS, json.dumps(results, ensure_ascii=False, indent=1))
        print(summary_line(results), flush=True)
        if stop.requested:
            return _finish(folder, "aborted", 1,
                           BadInput(msg("eval.stopped", n=results.get("n", 0))))
        return _finish(folder, "completed", 0)
    except BadInput as err:
        print(f"error: {err}", flush=True)
        return _finish(folder, "failed", 2, err)
    except BaseException as err:
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        traceback.print_exc()
        return _finish(folder, "failed", 1, f"{type(err).__name__}: {err}")


def _sides(config: cfg.EvalConfig) -> list[str]:
    """The checkpoint, and the base beside it when there is a checkpoint to compare."""
    return ["model", "base"] if config.compare_base and config.adapter else ["model"]


def _load(config: cfg.EvalConfig):
    from .chat import ChatEngine
    engine = ChatEngine()
    loaded = engine.load(config.model, config.adapter or None,
                         trust_remote_code=config.trust_remote_code)
    models.pick_cpu_threads(loaded.params, generates=True)
    print(loaded.describe(), flush=True)
    return engine


def _provenance(config: cfg.EvalConfig, started: float, partial: bool) -> dict:
    return {"model_name": config.model, "adapter": config.adapter or None,
            "dataset": list(config.dataset) if config.eval_task in cfg.DATASET_TASKS else [],
            "partial": partial,
            "elapsed_s": round(time.monotonic() - started, 2), "created_at": runs.now_iso()}


def summary_line(results: dict) -> str:
    """results.json in one line for the log and the terminal."""
    return summary_msg(results).text()


def summary_msg(results: dict) -> Msg:
    """summary_line as a message, for a page to show in its visitor's language."""
    def side(values: dict | None) -> str:
        return ", ".join(f"{k} {_fmt(v)}" for k, v in (values or {}).items())
    line = msg("eval.summary", task=results["task"], n=results["n"],
               model=side(results["model"]))
    if results.get("base"):
        return msg("eval.summary.base", line=line, base=side(results["base"]))
    return line


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _finish(folder: Path, state: str, code: int, error: "BadInput | str | None" = None) -> int:
    """Record the ending; a BadInput's record goes beside its English text (error_msg)."""
    runs.write_status(folder, state, exit_code=code, kind=KIND, **_error(error))
    print(f"eval {state}" + (f": {error}" if error else "") + f" ({folder})", flush=True)
    return code


def _error(err: "BadInput | str | None") -> dict:
    """status.json's `error` (English) and `error_msg` (its language-neutral record)."""
    if isinstance(err, BadInput):
        return {"error": err.text("en"), "error_msg": runs.error_record(err)}
    return {"error": err, "error_msg": None}


def _phase(what: "Msg | str") -> dict:
    """status.json's `phase` text and its record (`phase_msg`), for the page's language."""
    return {"phase": text_of(what), "phase_msg": what.record() if isinstance(what, Msg) else None}
