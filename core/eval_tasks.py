"""The eval tasks of `tunebench eval`, as rows of one table (TASKS).

Each task has a `check`, run before any job folder exists, which reads and vets its
inputs (bad input names the file, record and field), and a `run`, which measures each
side (the checkpoint, and the base when compared) and returns results.json's body:
{"task", "n", "model": {metric: value}, "base": {...} | None, ...}.

- loss: the summed token loss over the trained tokens, divided by their count: the
  figure training's eval loss reports (core/trainer.py weights it the same way), so the
  two agree on the same rows whatever the batching. Rows are batched by length.
- predict / probes: batched greedy (or sampled) replies (ChatEngine.replies), each row
  written to predictions.jsonl as it is produced; predict scores them (core/scoring.py).
- choice / harness: lm-evaluation-harness (core/harness.py), on the loaded model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import config as cfg
from . import data, stages
from .errors import BadInput
from .i18n import Msg, msg

PREDICTIONS = "predictions.jsonl"
SIDE_OF_ENGINE = {"model": "after", "base": "before"}  # ChatEngine's names for the sides


@dataclass
class Inputs:
    """What a task read while checking: rows to score, harness task names or files."""
    rows: list = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    files: list = field(default_factory=list)      # (source, records) of choice files


@dataclass
class Job:
    """What a task's run gets: the settings, the folder, the loaded engine, and the
    progress and stop objects of core/evaluate.py."""
    config: cfg.EvalConfig
    folder: Path
    engine: object
    inputs: Inputs
    sides: list[str]
    stop: object
    progress_for: Callable[[int, str], object]


@dataclass
class Task:
    check: Callable[[cfg.EvalConfig], Inputs]
    run: Callable[[Job], dict]
    what: Msg                      # what it measures, as status.json's phase says
    reads: tuple[str, ...] = ()    # the dataset kinds (core.data.dataset_kind) it reads


def _results(task: str, n: int, per_side: dict[str, dict], **extra) -> dict:
    return {"task": task, "n": n, "model": per_side.get("model", {}),
            "base": per_side.get("base"), **extra}


# --- loss --------------------------------------------------------------------------

LOSS_STAGE = {"chat": "sft", "text": "pt"}  # how training reads each kind


def check_loss(config: cfg.EvalConfig) -> Inputs:
    """The records, read as training reads them (sft for chat, pt for plain text)."""
    records = []
    for name in config.dataset:
        kind = data.dataset_kind(name, config.dataset_dir)
        if kind not in LOSS_STAGE:
            raise BadInput(msg("eval.loss.kind", kind=kind), file=name, field="dataset")
        view = train_view(config, LOSS_STAGE[kind], [name])
        records += [(LOSS_STAGE[kind], r) for r in data.load_records(view)]
    if not records:
        raise BadInput(msg("eval.no_records"), field="dataset")
    return Inputs(rows=records)


def train_view(config: cfg.EvalConfig, stage: str, dataset: list[str]) -> cfg.TrainConfig:
    """The training config that reads `dataset` exactly as a training run of it would."""
    return dataclasses.replace(
        cfg.TrainConfig(), model=config.model, dataset=list(dataset),
        dataset_dir=config.dataset_dir, template=config.template, cutoff_len=config.cutoff_len,
        identity_name=config.identity_name, identity_author=config.identity_author,
        max_samples=config.max_samples, stage=stage)


def run_loss(job: Job) -> dict:
    tokenizer, cutoff = job.engine.tokenizer, job.config.cutoff_len
    rows = [stages.STAGES[stage].encode(record, tokenizer, cutoff)
            for stage, record in job.inputs.rows]
    rows = sorted((r for r in rows if r is not None and any(x != -100 for x in r["labels"])),
                  key=lambda r: len(r["input_ids"]))  # batches of similar length pad little
    if not rows:
        raise BadInput(msg("eval.loss.no_tokens", cutoff=cutoff), field="dataset")
    size = job.config.batch_size
    batches = [rows[i:i + size] for i in range(0, len(rows), size)]
    progress = job.progress_for(len(batches) * len(job.sides), "batches")
    per_side = {}
    for side in job.sides:
        total, count = 0.0, 0
        with job.engine.using(SIDE_OF_ENGINE[side]) as model:
            for batch in batches:
                if job.stop.requested:
                    break
                nll, n = _batch_nll(model, batch, tokenizer)
                total, count = total + nll, count + n
                progress.advance(1, side)
        loss = total / count if count else float("nan")
        per_side[side] = {"loss": round(loss, 6), "perplexity": round(math.exp(loss), 4),
                          "tokens": count}
    return _results("loss", len(rows), per_side)


def _batch_nll(model, batch: list[dict], tokenizer) -> tuple[float, int]:
    """Summed next-token loss over the trained tokens of a right-padded batch, and their
    count (labels -100 are prompt, padding or masked: not counted, as in training)."""
    import torch
    import torch.nn.functional as F

    width = max(len(r["input_ids"]) for r in batch)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in batch])
    labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in batch])
    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"]))
                         for r in batch])
    with torch.inference_mode():
        logits = model(input_ids=ids.to(model.device),
                       attention_mask=mask.to(model.device)).logits.float()
    target = labels[:, 1:].to(logits.device)
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                          ignore_index=-100, reduction="sum")
    return float(nll), int((target != -100).sum())


# --- predict and probes -------------------------------------------------------------

# The stage whose reading of a dataset kind yields a prompt and a reference reply.
READS_REFERENCES = {"chat": "sft", "pairs": "dpo", "prompts": "grpo"}


def check_predict(config: cfg.EvalConfig) -> Inputs:
    """Each record's prompt (the conversation up to its last user turn) and reference (the
    reply the dataset gives); a record without one is bad input."""
    identity = (config.identity_name, config.identity_author)
    rows = []
    for name in config.dataset:
        kind = data.dataset_kind(name, config.dataset_dir)
        if kind not in READS_REFERENCES:
            raise BadInput(msg("eval.predict.kind", kind=kind), file=name, field="dataset")
        records, _ = data.read_dataset(name, config.dataset_dir, READS_REFERENCES[kind], identity)
        records = records[:config.max_samples] if config.max_samples else records
        rows += [_reference_row(r, i, name) for i, r in enumerate(records, start=1)]
    if not rows:
        raise BadInput(msg("eval.no_records"), field="dataset")
    return Inputs(rows=rows)


def _reference_row(record: dict, number: int, source: str) -> dict:
    if "messages" in record:
        messages = record["messages"]
        if messages[-1]["role"] != "assistant":
            raise BadInput(msg("eval.predict.ends_with_user"), file=source, record=number,
                           field="messages")
        return {"prompt": messages[:-1], "reference": messages[-1]["content"]}
    reference = record.get("chosen", record.get("answer"))
    if reference is None or not str(reference).strip():
        raise BadInput(msg("eval.predict.no_reference"), file=source, record=number,
                       field="answer")
    return {"prompt": record["prompt"], "reference": str(reference)}


def check_probes(config: cfg.EvalConfig) -> Inputs:
    """The Chat tab's probe prompts, each a one-turn conversation (no reference)."""
    from .chat import DEFAULT_PROBES
    return Inputs(rows=[{"prompt": [{"role": "user", "content": p}], "reference": None}
                        for p in DEFAULT_PROBES])


def run_predict(job: Job) -> dict:
    """Reply to every prompt on each side, in batches, writing each row as it is done."""
    rows, config = job.inputs.rows, job.config
    scored = config.eval_task == "predict"
    # Longest prompts first: similar lengths share a batch, and memory trouble shows early.
    order = sorted(range(len(rows)), key=lambda i: -_chars(rows[i]["prompt"]))
    batches = [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    progress = job.progress_for(len(rows), "replies")
    done: list[dict] = []
    with open(job.folder / PREDICTIONS, "a", encoding="utf-8") as out:
        for batch in batches:
            if job.stop.requested:
                break
            prompts = [_with_system(rows[i]["prompt"], config.system) for i in batch]
            replies = {side: job.engine.replies(prompts, config.generation, SIDE_OF_ENGINE[side])
                       for side in job.sides}
            for k, i in enumerate(batch):
                line = _prediction_line(i, rows[i], {s: r[k] for s, r in replies.items()},
                                        scored)
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
                done.append(line)
            out.flush()
            progress.advance(len(batch), "+".join(job.sides))
    if not scored:
        return _probe_results(job, done)
    from .scoring import mean_scores
    per_side = {side: mean_scores([d[_SCORES[side]] for d in done]) for side in job.sides}
    return _results("predict", len(done), per_side)


_PREDICTION = {"model": "prediction", "base": "base_prediction"}
_SCORES = {"model": "scores", "base": "base_scores"}


def _prediction_line(index: int, row: dict, replies: dict, scored: bool) -> dict:
    """One predictions.jsonl object: the prompt, the reference and each side's reply."""
    prompt = row["prompt"]
    line = {"index": index, "prompt": prompt[-1]["content"], "reference": row["reference"]}
    if len(prompt) > 1:
        line["context"] = prompt[:-1]
    for side, reply in replies.items():
        line[_PREDICTION[side]] = reply.text
        line[f"{_PREDICTION[side]}_finish"] = reply.finish
        if scored:
            from .scoring import score
            line[_SCORES[side]] = score(reply.text, row["reference"])
    return line


def _probe_results(job: Job, done: list[dict]) -> dict:
    """The probe table (probes.json, as the Chat tab saves it) and how often each side
    names itself as the identity settings say."""
    from .chat import PROBES_FILE, save_probes
    table = [{"prompt": d["prompt"], "fine_tuned": d["prediction"],
              "base": d.get("base_prediction")} for d in sorted(done, key=lambda d: d["index"])]
    save_probes(job.folder / PROBES_FILE, table, model=job.config.model,
                checkpoint=job.config.adapter or None, settings=job.config.generation)
    name = job.config.identity_name.strip().lower()
    per_side = {side: {"mentions_name": round(100 * sum(
        name in (d.get(_PREDICTION[side]) or "").lower() for d in done) / max(len(done), 1), 2)}
        for side in job.sides} if name else {}
    return _results("probes", len(done), per_side)


def _with_system(prompt: list[dict], system: str) -> list[dict]:
    if system.strip() and prompt[0]["role"] != "system":
        return [{"role": "system", "content": system}] + prompt
    return prompt


def _chars(prompt: list[dict]) -> int:
    return sum(len(m["content"]) for m in prompt)


# --- lm-evaluation-harness: a multiple-choice file, or tasks by name -----------------

def check_choice(config: cfg.EvalConfig) -> Inputs:
    """Each multiple-choice file read and vetted (question, A-D, answer)."""
    files = [data.read_choice(name, config.dataset_dir) for name in config.dataset]
    return Inputs(files=files)


def check_harness(config: cfg.EvalConfig) -> Inputs:
    from . import harness
    harness.check_tasks(config.harness_tasks)
    return Inputs(tasks=list(config.harness_tasks))


def run_harness(job: Job) -> dict:
    """Each task on each side through lm-evaluation-harness; one table."""
    from . import harness
    tasks, include = list(job.inputs.tasks), None
    for source, records in job.inputs.files:  # local tasks, written into the job folder
        name, include = harness.choice_task(records, Path(source), job.folder)
        tasks.append(name)
    progress = job.progress_for(len(tasks) * len(job.sides), "tasks")
    found: dict[str, dict[str, dict]] = {}
    for side in job.sides:
        for task in tasks:
            if job.stop.requested:
                break
            with job.engine.using(SIDE_OF_ENGINE[side]) as model:
                found.setdefault(task, {})[side] = harness.evaluate(
                    model, job.engine.tokenizer, [task], include_path=include,
                    batch_size=job.config.batch_size, limit=job.config.max_samples or None,
                    num_fewshot=job.config.num_fewshot)[task]
            progress.advance(1, side)
    per_side = {side: _pooled([found[t][side] for t in found if side in found[t]])
                for side in job.sides}
    n = sum(found[t]["model"]["n"] for t in found if "model" in found[t])
    by_task = {t: {"n": v["model"]["n"] if "model" in v else None,
                   "model": _metrics(v.get("model")), "base": _metrics(v.get("base"))}
               for t, v in found.items()}
    return _results(job.config.eval_task, n, per_side, tasks=by_task)


def _metrics(result: dict | None) -> dict | None:
    return None if result is None else {k: v for k, v in result.items() if k != "n"}


def _pooled(results: list[dict]) -> dict:
    """Accuracy over every question of several tasks, with its standard error (the tasks'
    errors combined as independent samples)."""
    if not results:
        return {}
    n = sum(r["n"] for r in results)
    if len(results) == 1:
        return _metrics(results[0])
    accuracy = sum(r["accuracy"] * r["n"] for r in results) / n
    if any(r["accuracy_stderr"] is None for r in results):  # a one-question task has none
        return {"accuracy": round(accuracy, 4), "accuracy_stderr": None}
    stderr = math.sqrt(sum((r["accuracy_stderr"] * r["n"]) ** 2 for r in results)) / n
    return {"accuracy": round(accuracy, 4), "accuracy_stderr": round(stderr, 4)}


TASKS: dict[str, Task] = {
    "loss": Task(check_loss, run_loss, msg("eval.task.loss"), tuple(LOSS_STAGE)),
    "predict": Task(check_predict, run_predict, msg("eval.task.predict"),
                    tuple(READS_REFERENCES)),
    "choice": Task(check_choice, run_harness, msg("eval.task.choice"), data.EVAL_KINDS),
    "harness": Task(check_harness, run_harness, msg("eval.task.harness")),
    "probes": Task(check_probes, run_predict, msg("eval.task.probes")),
}
assert set(TASKS) == set(cfg.EVAL_TASKS)
