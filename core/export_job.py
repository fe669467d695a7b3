"""`tunebench export` as a job: a folder under saves/exports that the page watches.

The Export tab starts an export the way the Evaluate tab starts an eval (core/launch.py's
start_export, the same detached spawn as train and eval): it writes the job folder and
runs `tunebench export <job>/config.yaml`. From then on the page only reads the folder
back, so a closed browser or a restarted server loses nothing, and a page that opens
reattaches to the running export:

    config.yaml    the export's settings (ExportJob): `tunebench export` reruns it as it is
    command.txt    the command line started
    status.json    state, pid, times, error, "kind": "export", "phase" (what it is doing)
    export.log     the job's stdout and stderr
    metrics.jsonl  progress: step, total_steps (100), elapsed_s, eta_s, message
    result.json    the verification result (export.export's), with "command": the
                   `tunebench export --model ...` line that reproduces it

The export itself writes into a hidden temp folder beside its destination and renames it
into place only when verified (core/export.py), so a failed or stopped job leaves no
folder that looks complete; the job folder records what happened.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import shlex
import signal
import time
import traceback
from pathlib import Path

from . import config as cfg
from . import export, jobs, runs, schema
from .errors import BadInput
from .i18n import Msg, msg, text_of

KIND = "export"
LOG = runs.EXPORT_LOG
RESULT = "result.json"
TOTAL_STEPS = 100  # progress is reported in hundredths of the whole export


@dataclasses.dataclass
class ExportJob:
    """Everything one export needs: what to export, where, and its ExportConfig settings."""
    model: str = "demo"
    adapter: str = ""
    out: str = ""
    format: str = "safetensors"
    gguf_type: str = "q8_0"
    shard_size: str = "2GB"
    dtype: str = "auto"
    verify: bool = True
    overwrite: bool = False

    def settings(self) -> cfg.ExportConfig:
        """The ExportConfig part, validated (a missing library is named here)."""
        return cfg.export_config({name: getattr(self, name)
                                  for name in schema.fields(cfg.ExportConfig)})


_JOB_KEYS = tuple(f.name for f in dataclasses.fields(ExportJob))


def job_of(raw: dict, source: str = "the command line") -> ExportJob:
    """An ExportJob from a mapping (config.yaml, flags); unknown keys and bad settings are
    BadInput naming the source."""
    unknown = [key for key in raw if key not in _JOB_KEYS]
    if unknown:
        raise BadInput(msg("export.unknown_setting", key=str(unknown[0]),
                           keys=", ".join(_JOB_KEYS)), file=source, field=str(unknown[0]))
    settings = cfg.export_config({k: v for k, v in raw.items()
                                  if k in schema.fields(cfg.ExportConfig)}, source)
    job = ExportJob(**{k: v for k, v in raw.items() if k not in schema.fields(cfg.ExportConfig)})
    job = dataclasses.replace(job, **schema.to_dict(settings))
    for name in ("verify", "overwrite"):
        if not isinstance(getattr(job, name), bool):
            raise BadInput(msg("export.not_bool", got=repr(getattr(job, name))), file=source,
                           field=name)
    job.adapter = str(job.adapter or "")
    return job


def command_line(job: ExportJob) -> list[str]:
    """The `tunebench export` flags that reproduce this export (shown with its result)."""
    argv = ["tunebench", "export", "--model", job.model]
    if job.adapter:
        argv += ["--adapter", job.adapter]
    argv += ["--out", job.out]
    settings = schema.to_dict(job.settings())
    for name, value in settings.items():
        if name == "gguf_type" and job.format != "gguf":
            continue  # read only by gguf
        if name == "shard_size" and job.format != "safetensors":
            continue
        if value != schema.default_value(cfg.ExportConfig, name) or name == "format":
            argv += [schema.fields(cfg.ExportConfig)[name].metadata["flag"], str(value)]
    if job.overwrite:
        argv.append("--overwrite")
    if not job.verify:
        argv.append("--no-verify")
    return argv


# --- before starting: light checks the page runs (no torch) ------------------------------

def source_folder(job: ExportJob) -> Path | None:
    """The folder whose weights are exported, without building or loading anything: a full
    checkpoint itself, else the base model (None for a hub id)."""
    if job.adapter and (Path(job.adapter) / "config.json").is_file() and not (
            Path(job.adapter) / "adapter_config.json").is_file():
        return Path(job.adapter)
    if job.model == cfg.DEMO_MODEL:
        from .demo_model import default_path
        return default_path()
    return Path(job.model) if Path(job.model).is_dir() else None


def size_estimate(job: ExportJob) -> dict | None:
    """export.estimate for this job's source, or None when its size is not known here."""
    source = source_folder(job)
    if source is None or not (source / "config.json").is_file():
        return None
    return export.estimate(source, job.format, job.gguf_type, job.dtype)


def preflight(job: ExportJob) -> None:
    """What can be refused at once, before a process starts: the settings (a library of the
    format missing), the destination, and the disk space against the size estimate. The job
    checks all of it again, and the rest (the checkpoint, the architecture) before any work."""
    job.settings()
    if not job.out.strip():
        raise BadInput(msg("export.no_folder"), field="out")
    dest = Path(job.out).expanduser().resolve()
    if dest.is_dir() and any(dest.iterdir()) and not job.overwrite:
        raise BadInput(msg("export.exists"), file=str(dest))
    sizes = size_estimate(job)
    if sizes:
        export.check_free_space(dest.parent, sizes["disk"], job.format)


# --- the job folder ----------------------------------------------------------------------

def jobs_root(saves: str | Path) -> Path:
    return Path(saves) / "exports"


def job_dir_for(saves: str | Path, job: ExportJob) -> Path:
    """saves/exports/export-<format>-<date>-<time> (-2, -3 within the same second)."""
    root = jobs_root(saves)
    name = f"export-{job.format}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    folder, n = root / name, 2
    while folder.exists():
        folder, n = root / f"{name}-{n}", n + 1
    return folder.resolve()


def is_export_job(folder: Path) -> bool:
    return (runs.read_status_raw(folder) or {}).get("kind") == KIND


def export_jobs(saves: str | Path) -> list[runs.RunSummary]:
    """The export jobs under saves/exports, newest first."""
    return [r for r in runs.list_runs(jobs_root(saves)) if r.kind == KIND]


def newest_running(saves: str | Path) -> Path | None:
    """The export job a page reattaches to: the newest one still running."""
    busy = [r for r in export_jobs(saves) if r.state == "running"]
    return busy[0].path if busy else None


def read_result(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / RESULT).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def read_job(folder: Path) -> ExportJob | None:
    try:
        return job_of(schema.read_yaml(Path(folder) / runs.CONFIG), str(folder))
    except (BadInput, OSError):
        return None


# --- progress ----------------------------------------------------------------------------

class JobReporter(export.Reporter):
    """export's progress as metrics.jsonl lines (step, total_steps, elapsed_s, eta_s) and
    status.json's phase, printed to the log too; the result goes to result.json."""

    def __init__(self, folder: Path, job: ExportJob):
        super().__init__(as_json=False)
        self.folder, self.job = Path(folder), job
        self.started = time.monotonic()

    def step(self, fraction: float, message: "str | Msg") -> None:
        elapsed = time.monotonic() - self.started
        # The linear guess is poor at the very start (libraries load), so none before 5%.
        eta = elapsed * (1 - fraction) / fraction if 0.05 <= fraction < 1 else None
        # Beside each text, its record (message_msg, phase_msg): the page shows it in the
        # language of whoever watches, whatever the language of this process.
        runs.append_metrics(self.folder, {
            "step": round(fraction * TOTAL_STEPS), "total_steps": TOTAL_STEPS, "epoch": None,
            "elapsed_s": round(elapsed, 2), "eta_s": round(eta, 1) if eta is not None else None,
            "message": text_of(message), **export.message_record(message)})
        runs.update_status(self.folder, phase=text_of(message),
                           phase_msg=export.message_record(message).get("message_msg"))
        super().step(fraction, message)

    def result(self, result: dict) -> None:
        result = dict(result, command=shlex.join(command_line(self.job)))
        runs.write_atomic(self.folder / RESULT, json.dumps(result, ensure_ascii=False, indent=1))
        super().result(result)


# --- the command -------------------------------------------------------------------------

def main(config_path: str | None, given: dict) -> int:
    """`tunebench export [CONFIG] [--flags]`: flags override the file. Run as a job in the
    file's folder when the launcher prepared it; otherwise a plain export."""
    job = job_from(config_path, given)
    if config_path and _launched_here(Path(config_path)):
        return run_job(job, Path(config_path).parent)
    return _export(job)


def job_from(config_path: str | None, given: dict) -> ExportJob:
    """The export the command line asks for: the file's settings, then the flags."""
    raw = schema.read_yaml(config_path) if config_path else {}
    raw.update({k: v for k, v in given.items() if v is not None})
    job = job_of(raw, config_path or "the command line")
    for name in ("model", "out"):
        if not str(getattr(job, name) or "").strip():
            raise BadInput(msg("export.flag_required", name=name), field=name)
    return job


def _export(job: ExportJob, report: export.Reporter | None = None) -> int:
    return export.main(job.model, job.adapter or None, job.out, shard_size=job.shard_size,
                       dtype=job.dtype, verify=job.verify, overwrite=job.overwrite,
                       format=job.format, gguf_type=job.gguf_type, report=report)


def _launched_here(config_path: Path) -> bool:
    """The launcher's job folder, not run yet: its config.yaml, status kind export, no
    result or progress."""
    folder = config_path.resolve().parent
    return (config_path.name == runs.CONFIG and is_export_job(folder)
            and not (folder / RESULT).exists() and not (folder / runs.METRICS).exists())


def run_job(job: ExportJob, folder: Path) -> int:
    """The export, recording its progress, result and ending in the job folder."""
    checking = msg("export.phase.checking")
    runs.write_status(folder, "running", pid=os.getpid(), kind=KIND, phase=text_of(checking),
                      phase_msg=checking.record())
    code, state, error, record = 1, "failed", None, None
    with runs.TeeLog(folder / LOG), jobs.own_pid_entry(folder):
        previous = signal.signal(signal.SIGTERM, export._interrupt)
        try:
            code = _export(job, JobReporter(folder, job))
            state = "completed" if code == 0 else "failed"
            if code != 0:
                error, record = _ending(msg("export.not_verified"))
        except BadInput as err:
            print(f"error: {err}", flush=True)
            code, error, record = 2, err.text("en"), runs.error_record(err)
        except KeyboardInterrupt:
            code, state = 130, "aborted"
            error, record = _ending(msg("export.stopped"))
        except Exception as err:  # noqa: BLE001 - recorded for the page, then reported
            traceback.print_exc()
            error = f"{type(err).__name__}: {err}"
        finally:
            signal.signal(signal.SIGTERM, previous)
        runs.write_status(folder, state, exit_code=code, error=error, error_msg=record)
        print(f"export {state}" + (f": {error}" if error else "") + f" ({folder})", flush=True)
    return code


def _ending(why: Msg) -> tuple[str, dict | None]:
    """status.json's English `error` and its language-neutral `error_msg` for `why`."""
    err = BadInput(why)
    return err.text("en"), runs.error_record(err)
