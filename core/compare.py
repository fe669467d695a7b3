"""Comparing runs: their curves on one x axis, the settings where they differ, their final
metrics and eval results, and a run's note and tags. Reads run folders only.

A `Comparison` keeps each run's files as last read, with their signatures
(core.runs.file_signature): a refresh re-reads only a file that changed, and metrics.jsonl
only from where it was left (it is append-only). A page can so follow live runs once a
second without re-parsing their history.

notes.json, in a run folder: {"note": str, "tags": [str]}, written atomically.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
import sys
from pathlib import Path

from . import config as cfg
from . import evaluate, limits, plot, runs, schema
from .errors import BadInput
from .i18n import msg, t

NOTES = "notes.json"
MAX_NOTE_CHARS = 4000
MAX_TAGS = 20
MAX_TAG_CHARS = 40
TAG_PREFIX = "tag:"     # a filter word that must be one of a run's tags

# The x axes a comparison can use: the metrics.jsonl field that gives each step's position
# (core/trainer.py writes num_tokens on training lines and elapsed_s on every line).
X_AXES = {"step": ("step", "step"), "tokens": ("num_tokens", "tokens seen"),
          "time": ("elapsed_s", "time (s)")}
# Curves every stage may log, before the stage's own signals (core.plot.SIGNALS).
BASE_METRICS = ("loss", "eval_loss", "learning_rate")   # labelled plot.metric.<name>
# Settings that differ between any two runs by their nature: never a difference worth showing.
IDENTITY = frozenset({"output_dir", "run_name", "resume"})


# --- notes and tags -------------------------------------------------------------------

def parse_tags(text: str | list | None) -> list[str]:
    """Tags from "a, b c" or a list: split on commas and spaces, unique, in order."""
    words = text if isinstance(text, list) else str(text or "").replace(",", " ").split()
    out = []
    for word in (str(w).strip().removeprefix(TAG_PREFIX) for w in words):
        if word and word not in out:
            out.append(word)
    return out


def read_notes(run_dir: Path) -> dict:
    """A run's note and tags ({"note": "", "tags": []} when it has none or the file is odd)."""
    try:
        raw = json.loads((Path(run_dir) / NOTES).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raw = {}
    raw = raw if isinstance(raw, dict) else {}
    note = raw.get("note") if isinstance(raw.get("note"), str) else ""
    tags = parse_tags(raw.get("tags")) if isinstance(raw.get("tags"), list) else []
    return {"note": note, "tags": tags}


def write_notes(run_dir: Path, note: str, tags: str | list) -> dict:
    """Check and store a run's note and tags (atomically: a reader never sees half a file)."""
    run_dir = Path(run_dir)
    if not (run_dir / runs.STATUS).is_file():
        raise BadInput(msg("job.compare.not_run"), file=str(run_dir))
    note = limits.check_text(note or "", "note", MAX_NOTE_CHARS, multiline=True).strip()
    tags = parse_tags(tags)
    if len(tags) > MAX_TAGS:
        raise BadInput(msg("job.compare.too_many_tags", most=MAX_TAGS, got=len(tags)),
                       field="tags")
    for tag in tags:
        limits.check_text(tag, "tags", MAX_TAG_CHARS)
    notes = {"note": note, "tags": tags}
    runs.write_atomic(run_dir / NOTES, json.dumps(notes, ensure_ascii=False, indent=1))
    return notes


def matches(run_dir: Path, query: str | None, notes: dict | None = None) -> bool:
    """Whether a run passes the runs list's filter: every word of `query` is one of its
    tags (tag:NAME or #NAME) or appears in its name, note or tags (case-insensitive)."""
    words = str(query or "").lower().split()
    if not words:
        return True
    notes = notes if notes is not None else read_notes(run_dir)
    tags = [t.lower() for t in notes["tags"]]
    text = " ".join([Path(run_dir).name, notes["note"], *notes["tags"]]).lower()
    for word in words:
        exact = word[len(TAG_PREFIX):] if word.startswith(TAG_PREFIX) else \
            word[1:] if word.startswith("#") else None
        if not (exact in tags if exact is not None else word in text):
            return False
    return True


# --- one run as the comparison reads it ------------------------------------------------

@dataclasses.dataclass
class RunData:
    """One run's curves, settings, status and notes, re-read only when a file changed."""
    path: Path
    tail: runs.MetricsTail = None
    curves: plot.Curves = None
    at_step: dict = None            # {axis field: {step: value}}, for the x axes
    settings: dict | None = None    # setting -> shown value, from config.yaml
    settings_error: str | None = None
    status: dict | None = None
    notes: dict = None
    last: dict = None               # the newest metrics line
    sigs: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.path = Path(self.path)
        self._reset_metrics()
        self.notes = {"note": "", "tags": []}

    def _reset_metrics(self):
        self.tail = runs.MetricsTail(self.path / runs.METRICS)
        self.curves = plot.Curves()
        self.at_step = {field: {} for field, _ in X_AXES.values() if field != "step"}
        self.last = {}

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def running(self) -> bool:
        return bool(self.status) and self.status.get("state") == "running"

    def _changed(self, filename: str) -> bool:
        sig = runs.file_signature(self.path / filename)
        if filename in self.sigs and self.sigs[filename] == sig:
            return False
        self.sigs[filename] = sig
        return True

    def refresh(self) -> bool:
        """Read what changed since the last refresh; True when anything did."""
        changed = False
        if self._changed(runs.METRICS):
            size = (self.sigs[runs.METRICS] or (0, 0))[1]
            if size < self.tail.offset:  # rewritten rather than appended: read it anew
                self._reset_metrics()
            self._add(self.tail.poll())
            changed = True
        # A running status is re-read each time: read_status notices a trainer that died.
        if self._changed(runs.STATUS) or self.running:
            status = runs.read_status(self.path)
            changed |= status != self.status
            self.status = status
        if self._changed(runs.CONFIG):
            self._read_settings()
            changed = True
        if self._changed(NOTES):
            self.notes = read_notes(self.path)
            changed = True
        return changed

    def _add(self, records: list[dict]) -> None:
        self.curves.add(records)
        for record in records:
            step = record.get("step")
            if not isinstance(step, int):
                continue
            for field, points in self.at_step.items():
                value = record.get(field)
                if isinstance(value, (int, float)) and math.isfinite(value) and (
                        field != "num_tokens" or "loss" in record):  # training lines count
                    points[step] = value
        if records:
            self.last = records[-1]

    def _read_settings(self) -> None:
        """config.yaml through the config loader, so every setting has its resolved value;
        a config the loader refuses (an older version's) is shown as written, with why."""
        self.settings_error = None
        try:
            config = cfg.load(self.path / runs.CONFIG)
            values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        except BadInput as err:
            self.settings_error = str(err)
            try:
                values = schema.read_yaml(self.path / runs.CONFIG)
            except (BadInput, OSError):
                values = {}
        self.settings = {k: schema.format_value(v) for k, v in values.items()
                         if k not in IDENTITY}

    def x_of(self, axis: str, steps: list[int]) -> list[float | None]:
        """Each step's position on `axis`: steps as they are, else the value logged at that
        step or, for a line that does not carry it (an eval line), the last one before."""
        field = X_AXES[axis][0]
        if field == "step":
            return list(steps)
        points = self.at_step[field]
        known = sorted(points)
        out = []
        for step in steps:
            i = bisect.bisect_right(known, step)
            out.append(points[known[i - 1]] if i else None)
        return out

    def curve(self, metric: str, axis: str) -> tuple[list, list]:
        """(x, value) of one metric on one axis, finite values only, in step order."""
        steps, values = self.curves.series(metric)
        kept = [(x, y) for x, y in zip(self.x_of(axis, steps), values)
                if x is not None and math.isfinite(y)]
        return [x for x, _ in kept], [y for _, y in kept]


# --- a comparison of several runs ------------------------------------------------------

class Comparison:
    """The runs being compared, in the order picked (one per browser tab or command)."""

    def __init__(self, paths: list[Path] = ()):
        self.runs: dict[Path, RunData] = {}
        # The eval jobs of the runs, found again only when the saves folder's runs change,
        # and each job's results, read again only when results.json changed.
        self._jobs_key: tuple | None = None
        self._jobs: dict[Path, list[Path]] = {}
        self._results: dict[Path, tuple] = {}
        self.select(paths)

    def select(self, paths: list[Path]) -> None:
        """Compare these runs; those already read are kept as they are."""
        self.runs = {Path(p): self.runs.get(Path(p)) or RunData(Path(p)) for p in paths}

    def refresh(self) -> bool:
        """Re-read what changed in any run; True when anything did."""
        changed = False
        for run in self.runs.values():
            changed |= run.refresh()
        return changed

    @property
    def live(self) -> bool:
        return any(run.running for run in self.runs.values())

    def metrics(self) -> list[tuple[str, str]]:
        """(label, metric) of the curves any of the runs logged: loss, eval loss, learning
        rate, then the stages' own signals, each followed by its eval version."""
        keys = set()
        for run in self.runs.values():
            keys.update(run.curves.keys())
        out = [(t(f"plot.metric.{name}"), name) for name in BASE_METRICS if name in keys]
        for name in plot.signal_names(keys):
            for key in (name, plot.EVAL_PREFIX + name):
                if key in keys:
                    out.append((plot.signal_short(key), key))
        return out

    def rows(self, metric: str, axis: str) -> list[tuple]:
        """(x, value, run) rows of one metric for every run: the chart's long-form data."""
        rows = []
        for run in self.runs.values():
            xs, ys = run.curve(metric, axis)
            rows += [(x, y, run.name) for x, y in zip(xs, ys)]
        return rows

    def missing(self, metric: str, axis: str) -> list[str]:
        """The runs that have no point of `metric` on `axis` (the page says so)."""
        return [run.name for run in self.runs.values() if not run.curve(metric, axis)[0]]

    def differing_settings(self) -> list[tuple[str, list[str]]]:
        """(setting, value per run) for each setting whose value is not the same in all."""
        names = []
        for run in self.runs.values():
            names += [k for k in run.settings or {} if k not in names]
        out = []
        for name in names:
            values = [(run.settings or {}).get(name, "–") for run in self.runs.values()]
            if len(set(values)) > 1:
                out.append((name, values))
        return out

    def final_metrics(self) -> list[tuple[str, list[str]]]:
        """(what, value per run): state, steps, last loss, best eval loss, runtime, in the
        current language."""
        table = {"state": [], "steps": [], "last loss": [], "best eval loss": [],
                 "runtime": []}  # each row's name is job.compare.row.<name> (spaces: _)
        for run in self.runs.values():
            losses = run.curve("loss", "step")[1]
            evals = run.curve("eval_loss", "step")[1]
            runtime = run.last.get("train_runtime") or run.last.get("elapsed_s")
            state = (run.status or {}).get("state", "?")
            table["state"].append(t(f"job.state.{state}") if state in runs.STATES else state)
            table["steps"].append(f"{run.last.get('step', 0)}/{run.last.get('total_steps', '?')}")
            table["last loss"].append(f"{losses[-1]:.4f}" if losses else "–")
            table["best eval loss"].append(f"{min(evals):.4f}" if evals else "–")
            table["runtime"].append(format_seconds(runtime))
        return [(t("job.compare.row." + what.replace(" ", "_")), values)
                for what, values in table.items()]

    def eval_results(self, saves_dir: Path) -> list[tuple[str, list[str]]]:
        """(eval: task, results per run) from the newest eval job of each task that
        evaluated a checkpoint of the run (core.evaluate.jobs_of_run)."""
        key = (tuple(self.runs), tuple(runs.run_dirs(saves_dir)))
        if key != self._jobs_key:
            self._jobs_key = key
            self._jobs = {path: evaluate.jobs_of_run(saves_dir, path) for path in self.runs}
        found: dict[str, dict[Path, str]] = {}
        for run in self.runs.values():
            for job in self._jobs.get(run.path, []):  # newest first
                results = self._read_results(job)
                if not results or not results.get("task"):
                    continue
                row = t("job.compare.eval_row", task=results["task"])
                found.setdefault(row, {}).setdefault(run.path, results_text(results))
        return [(what, [per_run.get(p, "–") for p in self.runs]) for what, per_run in
                sorted(found.items())]

    def _read_results(self, job: Path) -> dict | None:
        sig = runs.file_signature(job / evaluate.RESULTS)
        if job not in self._results or self._results[job][0] != sig:
            self._results[job] = (sig, evaluate.read_results(job) if sig else None)
        return self._results[job][1]

    def table(self, saves_dir: Path | None = None) -> tuple[list[str], list[list[str]]]:
        """(columns, rows): final metrics, eval results, then the settings that differ."""
        columns = ["", *(run.name for run in self.runs.values())]
        rows = self.final_metrics()
        if saves_dir is not None:
            rows += self.eval_results(saves_dir)
        rows += self.differing_settings()
        return columns, [[what, *values] for what, values in rows]


def results_text(results: dict) -> str:
    """An eval job's model scores in one cell: 'rouge_l 65.2, bleu_4 40.1' (partial marked)."""
    model = results.get("model") or {}
    text = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in model.items() if not isinstance(v, (dict, list)))
    return t("job.compare.partial", text=text or "?") if results.get("partial") else text or "?"


def format_seconds(seconds) -> str:
    """1:02:03 or 2:03 ('–' when unknown)."""
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return "–"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else \
        f"{rest // 60}:{rest % 60:02d}"


# --- from a terminal: python -m core.compare ---------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """`python -m core.compare RUN RUN ...` prints what the page's table shows;
    `python -m core.compare RUN --note TEXT --tags a,b` sets a run's note and tags."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m core.compare", description=main.__doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders")
    parser.add_argument("--note", help="set the note of the (one) run")
    parser.add_argument("--tags", help="set the tags of the (one) run: a,b or 'a b'")
    args = parser.parse_args(argv)
    try:
        if args.note is not None or args.tags is not None:
            if len(args.runs) != 1:
                raise BadInput(msg("job.compare.one_run"))
            old = read_notes(args.runs[0])
            saved = write_notes(args.runs[0], old["note"] if args.note is None else args.note,
                                old["tags"] if args.tags is None else args.tags)
            print(json.dumps(saved, ensure_ascii=False))
            return 0
        for path in args.runs:
            if not (path / runs.STATUS).is_file():
                raise BadInput(msg("job.compare.not_run"), file=str(path))
        comparison = Comparison(args.runs)
        comparison.refresh()
        columns, rows = comparison.table(args.runs[0].parent)
        widths = [max(len(str(r[i])) for r in [columns, *rows]) for i in range(len(columns))]
        for row in [columns, *rows]:
            print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())
    except BadInput as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
