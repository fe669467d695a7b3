"""Benchmarks through lm-evaluation-harness (lm_eval), on a model already loaded.

Two kinds of task run here:

- any task, group or tag lm_eval knows by name (arc_easy, mmlu, ceval-valid, ...).
  Their datasets come from the Hugging Face Hub, so offline only those already in
  the datasets cache run;
- a multiple-choice file of the user's (question, A, B, C, D, answer; read by
  core/data.py `read_choice`), written by `choice_task` as a local task: a JSON
  Lines file and a task YAML under the job's harness/ folder, scored offline.

`evaluate` returns accuracy in percent with its standard error and the number of
questions, per task. lm_eval is imported inside the functions: importing it takes
seconds, and listing its tasks (`check_tasks`) about ten more, done once a process.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Callable

from .data import CHOICE_LETTERS
from .errors import BadInput
from .i18n import Msg, msg

ProgressFn = Callable[[int, int], None]
FIELD = "harness_tasks"
TASK_PREFIX = "tunebench_"
# lm_eval's own seeds (simple_evaluate's defaults), so scores match its command line.
SEEDS = {"random": 0, "numpy": 1234, "torch": 1234, "fewshot": 1234}
# The prompt of the MMLU and C-Eval tasks in lm_eval: the question, the lettered
# options, then "Answer:". The model is scored on the letter (" A" .. " D") rather
# than the option's text: one token each, so options of different lengths compare
# fairly and the four share one forward pass; and it is how MMLU and C-Eval scores
# are reported, so a user's file in their layout is scored as they are.
PROMPT = "{{question}}\n" + "".join(f"{letter}. {{{{choices[{i}]}}}}\n"
                                    for i, letter in enumerate(CHOICE_LETTERS)) + "Answer:"
# Metrics read as accuracy, in order of preference: the share of questions answered
# right, whether chosen among options (acc) or generated (exact_match).
ACCURACY_METRICS = ("acc", "exact_match")
# Their standard errors have a closed form (any positive count selects it; 0 would drop
# them); resampling, for other metrics a task may also report, is kept short.
BOOTSTRAP_ITERS = 1000


# --- a user's multiple-choice file as a local task ------------------------------------

def choice_task(records: list[dict], source: Path, job_dir: Path) -> tuple[str, Path]:
    """Write multiple-choice `records` (data.read_choice's) as a local lm_eval task.

    Writes `job_dir/harness/<task>.jsonl` and `<task>.yaml`, the task named
    `tunebench_<stem of source>` (with a number added when another file of that stem
    is already there); returns (task name, the folder to include, the same for every
    file of a job).
    Few-shot examples, when asked for, come from the same file, never the
    question being asked (lm_eval's sampler leaves it out).
    """
    import yaml

    folder = Path(job_dir).resolve() / "harness"
    folder.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^a-z0-9_]+", "_", Path(source).stem.lower()).strip("_") or "choice"
    origin = json.dumps(str(source), ensure_ascii=False)  # quoted: a comment is one line
    header = f"# Written by tunebench from {origin}: {len(records)} questions.\n"
    name, number = TASK_PREFIX + stem, 1
    while _taken(folder / f"{name}.yaml", f"from {origin}:"):
        number += 1
        name = f"{TASK_PREFIX}{stem}_{number}"
    docs = folder / f"{name}.jsonl"
    with docs.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps({"question": record["question"], "choices": record["choices"],
                                  "answer": CHOICE_LETTERS.index(record["answer"])},
                                 ensure_ascii=False) + "\n")
    task = {
        "task": name,
        "dataset_path": "json",  # datasets' local JSON reader: nothing is downloaded
        "dataset_kwargs": {"data_files": {"test": str(docs)}},
        "test_split": "test",
        "fewshot_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": PROMPT,
        "doc_to_choice": list(CHOICE_LETTERS),
        "doc_to_target": "answer",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    (folder / f"{name}.yaml").write_text(
        header + yaml.safe_dump(task, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return name, folder


def _taken(task_file: Path, mark: str) -> bool:
    """Whether `task_file` exists and was written for another source file."""
    try:
        return mark not in task_file.read_text(encoding="utf-8").partition("\n")[0]
    except FileNotFoundError:
        return False


# --- task names ---------------------------------------------------------------------------

@functools.cache
def _all_tasks_manager():
    """lm_eval's index of its bundled tasks (about ten seconds: it reads some 14,000
    YAML files), built once a process."""
    from lm_eval.tasks import TaskManager

    with _quiet():
        return TaskManager()


def _local_manager(include_path: Path):
    """The tasks in `include_path` alone (fast: lm_eval's own are not indexed)."""
    from lm_eval.tasks import TaskManager

    with _quiet():
        return TaskManager(include_path=str(include_path), include_defaults=False)


def check_tasks(names: list[str], include_path: Path | None = None) -> None:
    """BadInput naming the first task, group or tag that neither lm_eval nor the local
    tasks in `include_path` know, with the closest known names."""
    local = set(_local_manager(include_path).all_tasks) if include_path else set()
    wanted = [n for n in names if n not in local]
    if not wanted:
        return  # no need to index lm_eval's own tasks
    known = _all_tasks_manager().all_tasks
    for name in wanted:
        if name in known:
            continue
        pool = sorted(set(known) | local)
        close = difflib.get_close_matches(name, pool, n=5, cutoff=0.6)
        hint = (msg("eval.harness.closest", names=", ".join(close)) if close
                else msg("eval.harness.none_close"))
        raise BadInput(msg("eval.harness.unknown", name=name, hint=hint, count=len(pool)),
                       field=FIELD)


# --- running ---------------------------------------------------------------------------------

def evaluate(model, tokenizer, tasks: list[str], *, include_path: Path | None = None,
             batch_size: int = 8, limit: int | None = None, num_fewshot: int | None = 0,
             disable_adapter: bool = False, progress: ProgressFn | None = None
             ) -> dict[str, dict]:
    """Score `model` on lm_eval `tasks` -> {task: {"accuracy", "accuracy_stderr", "n"}}.

    One entry per name in `tasks`. Accuracy and its standard error are in percent
    (lm_eval's acc, or exact_match for a task that generates its answer); the error
    is None where lm_eval gives none (a single question). n is the number of
    questions scored. A group is scored as lm_eval scores it (mmlu: over all its
    questions); a tag, or a group without an overall score, pools its tasks' questions.
    `include_path` holds local tasks (choice_task's). `limit` caps the questions per
    task; `num_fewshot` None keeps each task's own number of examples. With
    `disable_adapter` a PEFT model is scored without its adapter: the base, without
    loading it again. `progress(done, total)` hears each answered request (lm_eval
    hands them over in one batch per kind: choices, then generations).
    """
    import lm_eval

    if disable_adapter and not hasattr(model, "disable_adapter"):
        raise ValueError("disable_adapter needs a PEFT model (one loaded with its adapter)")
    loaded, leaves = _load_tasks(tasks, include_path, num_fewshot)
    lm = _harness_lm(model, tokenizer, batch_size, progress)
    _seed()
    with _quiet(), (model.disable_adapter() if disable_adapter else contextlib.nullcontext()):
        results = lm_eval.evaluate(lm=lm, task_dict=loaded, limit=limit, log_samples=False,
                                   bootstrap_iters=BOOTSTRAP_ITERS)
    return _scores(results, tasks, leaves)


def _load_tasks(names: list[str], include_path: Path | None, num_fewshot: int | None
                ) -> tuple[dict, dict[str, list[str]]]:
    """(lm_eval's TaskDict for `names`, their datasets loaded; the tasks each name stands
    for: itself, or a group's or tag's). BadInput when a dataset cannot be loaded."""
    check_tasks(names, include_path)
    local = _local_manager(include_path) if include_path else None
    merged, leaves = {"tasks": {}, "groups": {}, "group_map": {}}, {}
    for name in names:
        manager = local if local and name in local.all_tasks else _all_tasks_manager()
        try:
            with _quiet():
                one = manager.load([name])
        except ImportError as err:
            raise BadInput(msg("eval.harness.package", name=name, error=str(err)),
                           field=FIELD) from None
        except (ConnectionError, OSError) as err:  # datasets' offline and network errors
            if manager is local:
                raise BadInput(msg("eval.harness.local", name=name, error=str(err)),
                               file=str(include_path)) from None
            raise BadInput(_unreachable(name, err), field=FIELD) from None
        for key in merged:
            merged[key].update(one.get(key) or {})
        leaves[name] = list(one["tasks"])
    for task in merged["tasks"].values():
        _check_metric(task)
        if num_fewshot is not None and task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)  # 0 in a task's YAML stays
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=SEEDS["fewshot"])
    return merged, leaves


def _unreachable(name: str, err: Exception) -> Msg:
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if offline:
        return msg("eval.harness.offline", name=name)
    return msg("eval.harness.unreachable", name=name, error=str(err))


def _check_metric(task) -> None:
    """BadInput before the model runs when a task reports no accuracy (perplexity, BLEU)."""
    metrics = list(task.aggregation())
    if not any(m in metrics for m in ACCURACY_METRICS):
        raise BadInput(msg("eval.harness.no_accuracy", name=task.task_name,
                           metrics=", ".join(metrics) or msg("eval.harness.no_metric")),
                       field=FIELD)


def _seed() -> None:
    import random

    import numpy as np
    import torch

    random.seed(SEEDS["random"])
    np.random.seed(SEEDS["numpy"])
    torch.manual_seed(SEEDS["torch"])


# --- the model, as lm_eval sees it -------------------------------------------------------

def _harness_lm(model, tokenizer, batch_size: int, progress: ProgressFn | None):
    """lm_eval's HFLM around the loaded model (a PeftModel too: it forwards config,
    device and the forward pass to its base), reporting progress."""
    with _quiet(logging.ERROR):  # its warning that a loaded model ignores loading options
        lm = _counting_lm_class()(pretrained=model, tokenizer=tokenizer,
                                  batch_size=int(batch_size))
    lm.progress = progress
    return lm


@functools.cache
def _counting_lm_class():
    """HFLM that tells `progress(done, total)` about answered requests, about once a
    percent. lm_eval has no progress callback; it calls the LM's cache hook once per
    answer (the hook its response cache uses), and each request kind arrives as one list."""
    from lm_eval.api.model import CacheHook
    from lm_eval.models.huggingface import HFLM

    class Counter(CacheHook):
        def __init__(self, lm):
            super().__init__(None)
            self.lm = lm

        def add_partial(self, attr, req, res) -> None:
            self.lm.count()

    class CountingLM(HFLM):
        progress: ProgressFn | None = None
        done = total = told = 0

        def start(self, requests: list) -> bool:
            self.done, self.total, self.told = 0, len(requests), 0
            self.set_cache_hook(Counter(self))
            return self.progress is not None  # then no tqdm bar besides

        def count(self) -> None:
            self.done = min(self.done + 1, self.total)
            step = -(-self.total // 100)  # a percent, rounded up: at most 100 calls
            if self.progress is not None and (self.done - self.told >= step
                                              or self.done == self.total):
                self.told = self.done
                self.progress(self.done, self.total)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            quiet = self.start(requests)
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or quiet)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            quiet = self.start(requests)
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or quiet)

        def generate_until(self, requests, disable_tqdm: bool = False):
            quiet = self.start(requests)
            return super().generate_until(requests, disable_tqdm=disable_tqdm or quiet)

    return CountingLM


@contextlib.contextmanager
def _quiet(level: int = logging.WARNING):
    """lm_eval logs every step at INFO; keep its warnings and errors only (or `level`)."""
    logger = logging.getLogger("lm_eval")
    before = logger.level
    logger.setLevel(max(level, before))
    try:
        yield
    finally:
        logger.setLevel(before)


# --- results -----------------------------------------------------------------------------

def _scores(results: dict, names: list[str], leaves: dict[str, list[str]]
            ) -> dict[str, dict]:
    """lm_eval's results -> {name: {"accuracy", "accuracy_stderr", "n"}} in percent."""
    table, counts = results["results"], results["n-samples"]
    out = {}
    for name in names:
        if _metric_key(table.get(name, {})):  # a task, or a group with an overall score
            out[name] = _score(table[name], sum(counts[t]["effective"] for t in leaves[name]))
        else:  # a tag, or a group without one: its tasks' questions pooled
            out[name] = _pooled([_score(table[t], counts[t]["effective"])
                                 for t in leaves[name]])
    return out


def _pooled(scores: list[dict]) -> dict:
    """Accuracy over all the questions of several tasks; the error combines theirs as
    independent samples."""
    n = sum(s["n"] for s in scores)
    errors = [s["accuracy_stderr"] for s in scores]
    stderr = None if None in errors else \
        math.sqrt(sum((e * s["n"]) ** 2 for e, s in zip(errors, scores))) / n
    return {"accuracy": sum(s["accuracy"] * s["n"] for s in scores) / n,
            "accuracy_stderr": stderr, "n": n}


def _metric_key(row: dict) -> str | None:
    """The key of the accuracy in a result row ("acc,none", "exact_match,strict-match")."""
    for metric in ACCURACY_METRICS:
        keys = [k for k in row if k.split(",")[0] == metric]
        if keys:
            return f"{metric},none" if f"{metric},none" in keys else keys[0]
    return None


def _score(row: dict, n: int) -> dict:
    key = _metric_key(row)
    metric, filter_name = key.split(",", 1)
    stderr = row.get(f"{metric}_stderr,{filter_name}")
    ok = isinstance(stderr, (int, float)) and math.isfinite(stderr)
    return {"accuracy": 100.0 * row[key], "accuracy_stderr": 100.0 * stderr if ok else None,
            "n": int(n)}
