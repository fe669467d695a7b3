"""The run directory: the single source of truth for a run.

The trainer writes it; everything else (the web UI, `tunebench` commands, tests)
only reads it. Files, as in shared/SPEC.md:

    config.yaml    resolved config, rerunnable with `tunebench train`
    command.txt    the exact command line that was started
    status.json    state, pid, times, exit code, error
    metrics.jsonl  append-only, one JSON object per line
    train.log      the child process's stdout and stderr
    checkpoint-N/  resumable, loadable checkpoints
    final/         the result (PEFT adapter or whole model)
    loss.png       the final curve

status.json is replaced atomically (write a temp file, then rename) so a reader
never sees half a file. metrics.jsonl is only ever appended to.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from . import i18n
from .errors import BadInput
from .i18n import Msg, msg, t

STATES = ("queued", "running", "completed", "failed", "aborted")  # queued: core/job_queue.py
STATUS, METRICS, CONFIG, COMMAND, LOG = (
    "status.json", "metrics.jsonl", "config.yaml", "command.txt", "train.log")
EXPORT_LOG = "export.log"  # an export job's (core/export_job.py)
JOB_WORDS = {"train": "training", "eval": "evaluation", "serve": "API server",
             "export": "export"}  # a job's kind (status.json) in a sentence
EVAL_LOG = "eval.log"  # an eval job's log (core/evaluate.py); its status says kind "eval"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def default_run_name(method: str, stage: str = "sft") -> str:
    """<method>-<date>-<time>; stages other than sft lead with the stage (dpo-lora-...), so
    a reward model or a DPO run is told apart in the runs list and in saves/."""
    prefix = method if stage == "sft" else f"{stage}-{method}"
    return f"{prefix}-{dt.datetime.now():%Y%m%d-%H%M%S}"


def pick_run_dir(config, saves_dir: str | Path = "saves",
                 config_file: str | Path | None = None) -> Path:
    """The folder a run of `config` goes to: the one naming rule for `tunebench train`,
    Start on the Train tab, and its command snippet. Nothing is created.

    - output_dir, when set, is the folder; refused if it already holds a run;
    - else saves_dir/run_name, refused if that is taken;
    - else saves_dir/<method>-<date>-<time> (<stage>-<method>-... for stages other than
      sft), with -2, -3, ... for starts in the same second.
    Resuming the run in that folder (resume: true, or one of its checkpoints) is allowed.
    `config_file` is the config file being started (see holds_run).
    """
    if config.output_dir:
        run_dir = Path(config.output_dir).expanduser()
        if holds_run(run_dir, config_file) and not _resumes(config, run_dir):
            raise BadInput(msg("job.run.folder_taken"), file=str(run_dir), field="output_dir")
        return run_dir
    saves_dir = Path(saves_dir)
    if config.run_name:
        run_dir = saves_dir / config.run_name
        if run_dir.exists() and not _resumes(config, run_dir):
            raise BadInput(msg("job.run.name_taken", name=config.run_name, folder=str(run_dir)))
        return run_dir
    name = default_run_name(config.method, config.stage)
    run_dir, n = saves_dir / name, 2
    while run_dir.exists():
        run_dir, n = saves_dir / f"{name}-{n}", n + 1  # two starts in the same second
    return run_dir


def holds_run(folder: Path, config_file: str | Path | None = None) -> bool:
    """Whether `folder` already holds a run: a status, a config or metrics.

    When the config being started is the folder's own config.yaml (the launcher writes it
    before starting the trainer, and so does the Train tab's snippet), that file and the
    launcher's status are this run's own preparation: only metrics, which training
    writes, show an earlier run.
    """
    folder = Path(folder)
    if config_file is not None and Path(config_file).resolve() == (folder / CONFIG).resolve():
        return (folder / METRICS).exists()
    return any((folder / name).exists() for name in (STATUS, CONFIG, METRICS))


def _resumes(config, run_dir: Path) -> bool:
    """Whether `config` continues the run in `run_dir` (resume: true, or its checkpoint)."""
    if config.resume is True:
        return True
    return bool(config.resume) and Path(run_dir).resolve() in Path(
        str(config.resume)).expanduser().resolve().parents


def started_as() -> list[str]:
    """How this process was started, for command.txt: `tunebench` or `python -m core`."""
    if Path(sys.argv[0]).name == "__main__.py":
        return [sys.executable, "-m", "core"]
    return [sys.argv[0]]


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --- status ---------------------------------------------------------------------

def write_status(run_dir: Path, state: str, *, pid: int | None = None, error: str | None = None,
                 exit_code: int | None = None, **extra) -> dict:
    """Write status.json, keeping started_at (and pid) from the previous status."""
    assert state in STATES, state
    old = read_status_raw(run_dir) or {}
    ended = state not in ("running", "queued")
    # A (re)start gets a fresh start time; an ending keeps the start it ends.
    started_at = old.get("started_at") if ended and old.get("started_at") else now_iso()
    if pid is None and state != "queued":  # a queued job has no process yet
        pid = old.get("pid", os.getpid())
    status = {
        "state": state,
        "pid": pid,
        "started_at": started_at,
        "ended_at": now_iso() if ended else None,
        "exit_code": exit_code,
        "error": error,
    }
    if old.get("kind"):  # what the folder holds (an eval job) outlives every rewrite
        status["kind"] = old["kind"]
    status.update(extra)
    write_atomic(Path(run_dir) / STATUS, json.dumps(status, indent=1))
    return status


def error_record(err: BaseException | str | None) -> dict | None:
    """The language-neutral form of an error for status.json's `error_msg` (an id, its
    parameters and the place); None for an error that is not a BadInput (a bug's text)."""
    return err.record_of() if isinstance(err, BadInput) else None


def error_text(status: dict | None, lang: str | None = None) -> str | None:
    """A job's error as its reader reads it: from `error_msg` when the job wrote one (in
    `lang`, default the current language), else the English `error`."""
    if not status or not status.get("error_msg"):
        return (status or {}).get("error")
    return BadInput.rebuilt(status["error_msg"], status.get("error")).text(lang)


def error_fields(err: "BaseException | Msg | str | None") -> dict:
    """status.json's `error` (English, by contract) and `error_msg` (its language-neutral
    record, for error_text) for an ending's cause: a BadInput, a Msg of fixed wording, or
    a plain text (a bug's, which has no record, so no `error_msg`)."""
    if isinstance(err, Msg):
        return {"error": err.text("en"),
                "error_msg": {**err.record(), "file": None, "record": None, "field": None}}
    if isinstance(err, BadInput):
        return {"error": err.text("en"), "error_msg": error_record(err)}
    return {"error": None if err is None else str(err)}


def semicolons(items: list) -> "Msg | str":
    """Messages (or texts) joined by "; ", in whichever language they are shown."""
    joined = items[-1] if items else ""
    for item in reversed(items[:-1]):
        joined = msg("job.semicolon", first=item, rest=joined)
    return joined


def job_word(kind: str | None) -> Msg:
    """A job's kind (status.json) in a sentence: "training", "evaluation", ... (JOB_WORDS)."""
    return msg(f"job.kind.{kind if kind in JOB_WORDS else 'train'}")


# The phases a job reports in status.json (English, by contract) -> their catalogue ids.
def phase_text(phase: str | None, lang: str | None = None) -> str:
    """status.json's `phase` ("loading model") as its reader reads it (the catalogue's
    job.phase.loading_model); a phase the catalogue lacks as it is written."""
    phase = phase or "starting"
    key = "job.phase." + phase.replace(" ", "_")
    return t(key, lang) if i18n.has(key) else phase


def stopped_early_text(status: dict | None, lang: str | None = None) -> str | None:
    """Why a run stopped early, in the reader's language (`stopped_early_msg`), else the
    English `stopped_early`."""
    return i18n.recorded(status, "stopped_early", lang)


def update_status(run_dir: Path, **fields) -> None:
    """Change extra fields (such as "phase") of the current status without a state change."""
    status = read_status_raw(run_dir) or {}
    status.update(fields)
    write_atomic(Path(run_dir) / STATUS, json.dumps(status, indent=1))


def read_status_raw(run_dir: Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / STATUS).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def pid_alive(pid: int | None, started_at: str | None = None) -> bool:
    """True if `pid` is a live process that could be the one started at `started_at`.

    Guards against pid reuse: a process created after the run started is not ours.
    """
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if started_at:
            started = dt.datetime.fromisoformat(started_at).timestamp()
            return proc.create_time() <= started + 5
        return True
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def read_status(run_dir: Path) -> dict | None:
    """status.json, reconciled with reality.

    A run marked "running" whose process is gone (kill -9, OOM killer, reboot) is
    recorded as failed, so no run stays "running" forever. The ending is marked
    `guessed`: the launcher, if it is still alive to reap the process, replaces it
    with the real cause (the signal and the log tail).
    """
    status = read_status_raw(run_dir)
    if status and status.get("state") == "running" and not pid_alive(
            status.get("pid"), status.get("started_at")):
        gone = msg("job.process.disappeared", what=job_word(status.get("kind")))
        status = write_status(Path(run_dir), "failed", pid=status.get("pid"),
                              exit_code=status.get("exit_code"), **error_fields(gone),
                              guessed=True)
    return status


# --- the log -------------------------------------------------------------------

class TeeLog:
    """Copies this process's stdout and stderr into train.log, at the file-descriptor level.

    The fd level catches what C extensions and library loggers print too. When the
    launcher already sends our output to train.log, nothing is duplicated.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.active = False

    def __enter__(self):
        import threading

        if _same_file(1, self.path):
            return self
        sys.stdout.flush(), sys.stderr.flush()
        self.saved = os.dup(1), os.dup(2)
        read_end, self.write_end = os.pipe()
        log = open(self.path, "ab")

        def pump():
            with log:
                while chunk := os.read(read_end, 65536):
                    os.write(self.saved[0], chunk)
                    log.write(chunk)
                    log.flush()
            os.close(read_end)

        self.thread = threading.Thread(target=pump, daemon=True)
        self.thread.start()
        os.dup2(self.write_end, 1), os.dup2(self.write_end, 2)
        self.active = True
        return self

    def __exit__(self, *exc):
        if not self.active:
            return
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(self.saved[0], 1), os.dup2(self.saved[1], 2)
        os.close(self.write_end)
        self.thread.join(timeout=5)
        os.close(self.saved[0]), os.close(self.saved[1])


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


# --- metrics --------------------------------------------------------------------

def append_metrics(run_dir: Path, record: dict) -> None:
    line = json.dumps(record, ensure_ascii=False)
    with open(Path(run_dir) / METRICS, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
        fh.flush()


@dataclass
class MetricsTail:
    """Reads metrics.jsonl incrementally: each `poll` returns only new complete lines.

    The byte offset is kept so a watcher never re-reads the whole file; a partial
    last line (the writer is mid-append) is left for the next poll.
    """
    path: Path
    offset: int = 0
    records: list = field(default_factory=list)

    def poll(self) -> list[dict]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        new = []
        for line in chunk[:end].splitlines():
            try:
                new.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn line from a crashed writer is skipped, not fatal
        self.records.extend(new)
        return new


def read_metrics(run_dir: Path) -> list[dict]:
    tail = MetricsTail(Path(run_dir) / METRICS)
    tail.poll()
    return tail.records


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Debiased exponential moving average (as TensorBoard draws it).

    Each smoothed point depends only on points before it, so the history never
    shifts as new points arrive. The debias term stops the curve from starting at 0.
    """
    out, avg = [], 0.0
    for i, value in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * value
        out.append(avg / (1 - weight ** i) if weight < 1 else value)
    return out


# --- discovery ------------------------------------------------------------------

def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first. Temp folders are never listed."""
    found = []
    run_dir = Path(run_dir)
    for child in run_dir.iterdir() if run_dir.is_dir() else []:
        match = _CHECKPOINT.match(child.name)
        if match and child.is_dir() and not _leaves(child, run_dir):
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def _leaves(child: Path, folder: Path) -> bool:
    """A symlinked entry that resolves outside its folder (never read as part of it)."""
    return child.is_symlink() and folder.resolve() not in child.resolve().parents


def last_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def log_path(folder: Path) -> Path:
    """The folder's log: eval.log for an eval job, export.log for an export job, train.log
    for a run."""
    folder = Path(folder)
    return next((folder / name for name in (EVAL_LOG, EXPORT_LOG) if (folder / name).exists()),
                folder / LOG)


@dataclass
class RunSummary:
    path: Path
    name: str
    state: str
    started_at: str
    final_loss: float | None
    steps: str
    error: str | None
    kind: str = "train"           # "eval" for an eval job (core/evaluate.py)


# Summaries of ended runs, keyed by folder, with the (mtime, size) of the files they came
# from. Ended runs do not change, so a page listing hundreds of them (from many tabs)
# reads each metrics file once, not on every refresh.
_ended_summaries: dict[Path, tuple[tuple, RunSummary]] = {}


def file_signature(path: Path) -> tuple | None:
    """(mtime, size) of a file, None when it is missing: equal signatures, unchanged file."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return info.st_mtime_ns, info.st_size


def summarize(run_dir: Path) -> RunSummary | None:
    run_dir = Path(run_dir)
    signature = (file_signature(run_dir / STATUS), file_signature(run_dir / METRICS))
    cached = _ended_summaries.get(run_dir)
    if cached and cached[0] == signature:
        return cached[1]
    status = read_status(run_dir)
    if status is None:
        return None
    records = read_metrics(run_dir)
    losses = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float))
              and math.isfinite(r["loss"])]
    last = records[-1] if records else {}
    summary = RunSummary(run_dir, run_dir.name, status["state"],
                         status.get("started_at") or "", losses[-1] if losses else None,
                         f"{last.get('step', 0)}/{last.get('total_steps', '?')}",
                         status.get("error"), status.get("kind") or "train")
    if summary.state != "running":
        # The signature from before reading: a change made while reading shows next time.
        _ended_summaries[run_dir] = (signature, summary)
    return summary


def run_dirs(saves_dir: Path) -> list[Path]:
    """The run folders directly under `saves_dir`, sorted by name: the one scanner.

    A run folder is a folder holding status.json (hidden folders are not runs). Folders
    are found by resolving: a symlink placed in saves/ counts only when it resolves inside
    saves/ itself, so a link to a folder elsewhere is neither listed nor opened. Cheap enough for every
    page tick: a scandir, and a resolve only for the entries that are symlinks.
    """
    try:
        root = Path(saves_dir).resolve()
        entries = list(os.scandir(root))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for entry in entries:
        if entry.name.startswith("."):  # the API server's folder (.serve) and other hidden ones
            continue
        path = Path(entry.path)
        if entry.is_symlink():
            target = path.resolve()
            if target.parent != root and root not in target.parents:
                continue
        if entry.is_dir() and os.path.isfile(os.path.join(entry.path, STATUS)):
            found.append(path)
    return sorted(found)


def find_run(saves_dir: Path, name: str) -> Path | None:
    """The run folder called `name` in the runs list, or None (never a path outside it)."""
    return next((p for p in run_dirs(saves_dir) if p.name == name), None)


def list_runs(saves_dir: Path) -> list[RunSummary]:
    """Every run under `saves_dir`, newest first."""
    runs = [summarize(child) for child in run_dirs(saves_dir)]
    return sorted([r for r in runs if r], key=lambda r: r.started_at, reverse=True)


def loadable_checkpoints(saves_dir: Path) -> list[Path]:
    """Every checkpoint-N/ and final/ under saves_dir, for the chat and export pickers."""
    out = []
    for run in list_runs(saves_dir):
        final = run.path / "final"
        if final.is_dir() and not _leaves(final, run.path):
            out.append(final)
        out.extend(reversed(checkpoints(run.path)))
    return out
