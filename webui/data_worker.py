"""Reading datasets for the page, always in a child process.

The page server never parses a dataset itself. A large or hostile file (a
decompression bomb, a huge JSON document) would grow the server's memory for good,
since CPython rarely hands freed memory back, and a crash inside a parser would
take the page down; tokenizing also needs transformers, which the server never
imports (it costs seconds and hundreds of MB). So Start's data check, an upload's
validation and the preview each run in a child forked from a warm parent
(fork_server.py: `python -m webui.data_worker --fork-server`, started on first use),
which answers one JSON request and exits, and its memory goes with it. A preview so
takes about 0.1 s instead of the 3 s a fresh Python process needs to import
transformers. Where fork is missing, each request runs `python -m webui.data_worker`
with the request on stdin instead. The child inherits the server's environment,
confinement included (core/paths.py), so every path it opens passes the same gate.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from core import config as cfg
from core import i18n
from core.errors import BadInput
from core.i18n import msg, t

from . import fork_server

TIMEOUT_S = 300        # a hub tokenizer or the first demo-model build can take a while
LENGTH_SAMPLE = 1000   # records measured for the length summary


FORKS = fork_server.ForkServer("webui.data_worker") if hasattr(os, "fork") else None


def ask(action: str, request: dict, timeout: float = TIMEOUT_S) -> dict:
    """Run one action in a child process. Raises BadInput with the child's message.

    The child writes its texts (a preview's notes, a misfit) in the asker's language, and
    sends an error as its record too, so the page can show it in whichever language."""
    request = {"action": action, "lang": i18n.current(), **request}
    try:
        answer = FORKS.ask(request, timeout) if FORKS else _ask_new_process(request, timeout)
    except (TimeoutError, subprocess.TimeoutExpired):
        raise BadInput(msg("ui.train.err.data_timeout", seconds=f"{timeout:.0f}")) from None
    except fork_server.WorkerFailed as err:
        raise BadInput(msg("ui.train.err.data_failed", error=str(err))) from None
    if "error" in answer:
        raise BadInput.rebuilt(answer.get("error_msg"), answer["error"])
    return answer


def _ask_new_process(request: dict, timeout: float) -> dict:
    proc = subprocess.run([sys.executable, "-m", "webui.data_worker"], input=json.dumps(request),
                          capture_output=True, text=True, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict):
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise fork_server.WorkerFailed(f"exit code {proc.returncode}: {tail}")
    return answer


def preview(config: cfg.TrainConfig, count: int = 3) -> dict:
    """The first `count` records as the model sees them, and a length summary."""
    return ask("preview", {"config": cfg.to_dict(config), "count": count})


def check(config: cfg.TrainConfig) -> int:
    """Read every record of the config's datasets, as training will; returns the count."""
    return ask("check", {"config": cfg.to_dict(config)})["records"]


def register(file: str, dataset_dir: str, name: str | None) -> str:
    """Validate an uploaded file, copy it into dataset_dir and register it; returns its name."""
    return ask("register", {"file": file, "dataset_dir": dataset_dir, "name": name})["name"]


def register_for_stage(file: str, dataset_dir: str, name: str | None,
                       stage: str) -> tuple[str, str | None]:
    """`register`, then read the registered copy as `stage` trains on it: (its name, why
    the stage cannot train on it, or None when it can). A valid file of another kind
    stays registered, for the stage that reads it."""
    answer = ask("register", {"file": file, "dataset_dir": dataset_dir, "name": name,
                              "stage": stage})
    return answer["name"], answer.get("misfit")


def stage_datasets(dataset_dir: str) -> dict[str, list[str]]:
    """The registered datasets each stage can train on (core.data.datasets_for_stage),
    by stage. Telling a dataset's kind may read its first record, hence the child."""
    return ask("stage_datasets", {"dataset_dir": dataset_dir})["stages"]


def eval_check(config: cfg.EvalConfig) -> dict:
    """Every bad-input check of an eval job (core.evaluate.check: the checkpoint fits the
    model, each record has what the task needs), before any job folder exists. It loads
    tokenizers and reads adapters, hence the child. Returns what was read: rows, files."""
    return ask("eval_check", {"config": cfg.to_dict(config)})


def dataset_kinds(dataset_dir: str) -> dict[str, str | None]:
    """What each registered dataset holds (core.data.dataset_kind: chat, text, pairs, kto,
    prompts, choice), None for one that cannot be read. Telling may read a first record."""
    return ask("dataset_kinds", {"dataset_dir": dataset_dir})["kinds"]


def length_summary(lengths: list[int], cutoff: int, total: int) -> dict:
    return {"records": total, "measured": len(lengths), "min": min(lengths),
            "median": statistics.median(lengths), "max": max(lengths),
            "over_cutoff": sum(n > cutoff for n in lengths), "cutoff_len": cutoff}


def _chat_example(record: dict, tokenizer, cutoff: int) -> tuple[dict, int]:
    """sft and pt: the whole sequence, trained tokens marked."""
    from core import templates
    row = templates.encode_example(record, tokenizer, cutoff)
    segments = templates.trained_segments(tokenizer, row["input_ids"], row["labels"])
    full = len(templates.encode_example(record, tokenizer, 10**9)["input_ids"])
    return {"segments": segments, "tokens": len(row["input_ids"]),
            "trained": sum(lab != templates.IGNORE for lab in row["labels"])}, full


def _reply_segments(prompt_ids: list[int], reply_ids: list[int], tokenizer, mark: str
                    ) -> list[tuple[str, str | None]]:
    """A prompt and one reply as text runs, the reply's (trained) tokens marked `mark`."""
    from core import templates
    labels = [templates.IGNORE] * len(prompt_ids) + list(reply_ids)
    return [(text, mark if trained else None) for text, trained in
            templates.trained_segments(tokenizer, prompt_ids + reply_ids, labels)]


def _skipped(why: str) -> dict:
    return {"segments": [(t("ui.train.preview.left_out", why=why), None)], "tokens": 0,
            "trained": 0, "counts": t("ui.train.preview.left_out.counts")}


def _pair_example(record: dict, tokenizer, cutoff: int) -> tuple[dict, int]:
    """rm and dpo: the prompt, then the chosen and the rejected reply, each as trained
    (the token ids core.stages gives the trainer)."""
    from core import stages
    whole = stages.encode_pair(record, tokenizer, 10**9)
    full = len(whole["prompt_ids"]) + max(len(whole["chosen_ids"]),
                                          len(whole["rejected_ids"])) if whole else 0
    row = stages.encode_pair(record, tokenizer, cutoff)
    if row is None:
        return _skipped(t("ui.train.preview.reply_empty", cutoff=cutoff)), full
    prompt, chosen, rejected = row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]
    segments = _reply_segments(prompt, chosen, tokenizer, "chosen (trained)")
    segments += [("\n" + t("ui.train.preview.rejected_title") + "\n", None)]
    segments += _reply_segments([], rejected, tokenizer, "rejected (trained)")
    return {"segments": segments, "tokens": len(prompt) + max(len(chosen), len(rejected)),
            "trained": len(chosen) + len(rejected),
            "counts": t("ui.train.preview.pair_counts", prompt=len(prompt), chosen=len(chosen),
                        rejected=len(rejected))}, full


def _labelled_example(record: dict, tokenizer, cutoff: int) -> tuple[dict, int]:
    """kto: the prompt and the reply, marked by its label."""
    from core import stages
    whole = stages.encode_labelled(record, tokenizer, 10**9)
    full = len(whole["prompt_ids"]) + len(whole["completion_ids"]) if whole else 0
    row = stages.encode_labelled(record, tokenizer, cutoff)
    if row is None:
        return _skipped(t("ui.train.preview.the_reply_empty", cutoff=cutoff)), full
    prompt, reply, good = row["prompt_ids"], row["completion_ids"], row["label"]
    mark = "good reply (trained)" if good else "bad reply (trained)"
    return {"segments": _reply_segments(prompt, reply, tokenizer, mark),
            "tokens": len(prompt) + len(reply), "trained": len(reply),
            "counts": t("ui.train.preview.kto_counts", label=str(good).lower(),
                        kind=t("ui.train.preview.desirable" if good else
                               "ui.train.preview.undesirable"),
                        prompt=len(prompt), reply=len(reply))}, full


def _prompt_example(record: dict, tokenizer, cutoff: int) -> tuple[dict, int]:
    """grpo: the prompt as rendered for sampling, and the answer rule rewards compare to."""
    from core import templates
    text = templates.render_prompt(record["prompt"], tokenizer)
    length = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    answer = record.get("answer")
    segments = [(text, None), ("\n" + t("ui.train.preview.answer_title") + "\n", None)]
    segments.append((answer, "reference answer") if answer is not None else
                    (t("ui.train.preview.no_answer"), None))
    return {"segments": segments, "tokens": length, "trained": 0,
            "counts": t("ui.train.preview.prompt_counts", prompt=length)}, length


def _example(record: dict, tokenizer, cutoff: int) -> tuple[dict, int]:
    """One record as its stage trains on it (the shapes core.data.read_dataset returns),
    and its untruncated length in tokens."""
    if "chosen" in record:
        return _pair_example(record, tokenizer, cutoff)
    if "label" in record:
        return _labelled_example(record, tokenizer, cutoff)
    if "prompt" in record:
        return _prompt_example(record, tokenizer, cutoff)
    return _chat_example(record, tokenizer, cutoff)


def _compute(config: cfg.TrainConfig, count: int) -> dict:
    from core import data, models

    records = data.load_records(config)
    if not records:
        raise BadInput(msg("ui.train.err.no_records"), field="dataset")
    tokenizer = models.load_tokenizer(config.model, config.template, config.trust_remote_code)
    shown, lengths = [], []
    for i, record in enumerate(records[:max(count, LENGTH_SAMPLE)]):
        example, length = _example(record, tokenizer, config.cutoff_len)
        lengths.append(length)
        if i < count:
            shown.append(example)
    return {"examples": shown, "stage": config.stage,
            "summary": length_summary(lengths, config.cutoff_len, len(records))}


def _check(request: dict) -> dict:
    from core import data

    config = cfg.from_mapping(request["config"], source="the form")
    return {"records": len(data.load_records(config))}


def _register(request: dict) -> dict:
    from core import data

    key = data.register_file(request["file"], request["dataset_dir"], request.get("name"))
    stage = request.get("stage")
    if not stage:
        return {"name": key}
    # The registered copy, not the upload: it lies inside the allowed folders, and it is
    # read exactly as Start will read it.
    try:
        data.read_dataset(key, request["dataset_dir"], stage)
    except BadInput as err:
        return {"name": key, "misfit": str(err)}
    return {"name": key, "misfit": None}


def _stage_datasets(request: dict) -> dict:
    from core import data

    return {"stages": {stage: data.datasets_for_stage(stage, request["dataset_dir"])
                       for stage in cfg.STAGES}}


def _eval_check(request: dict) -> dict:
    from core import evaluate

    config = cfg.eval_config(request["config"], "the form")
    inputs = evaluate.check(config)
    return {"rows": len(inputs.rows), "files": len(inputs.files), "tasks": len(inputs.tasks)}


def _dataset_kinds(request: dict) -> dict:
    from core import data

    try:
        names = data.list_datasets(request["dataset_dir"])
    except BadInput:
        return {"kinds": {}}
    kinds = {}
    for name in names:
        try:
            kinds[name] = data.dataset_kind(name, request["dataset_dir"])
        except (BadInput, OSError, ValueError):
            kinds[name] = None  # reading it for a job says what is wrong
    return {"kinds": kinds}


def _preview(request: dict) -> dict:
    config = cfg.from_mapping(request["config"], source="the form")
    return _compute(config, int(request.get("count", 3)))


ACTIONS = {"check": _check, "register": _register, "preview": _preview,
           "stage_datasets": _stage_datasets, "eval_check": _eval_check,
           "dataset_kinds": _dataset_kinds}


def handle(request: dict) -> dict:
    """One request, in a child that answers only it: its texts in the asker's language."""
    lang = i18n.supported(request.get("lang"))
    if lang:
        i18n.set_resolver(lambda: lang)
    try:
        return ACTIONS[request["action"]](request)
    except BadInput as err:
        return {"error": str(err), "error_msg": err.record_of()}


def preload() -> None:
    """What the actions import, loaded once in the fork server's parent."""
    from transformers import AutoTokenizer  # noqa: F401  (the tokenizer machinery: 2-3 s)

    from core import data, evaluate, models, templates  # noqa: F401


def main(argv: list[str]) -> int:
    """Child side: with --fork-server PATH, the warm parent; else read a request on stdin
    and print one JSON answer on stdout."""
    if argv[:1] == ["--fork-server"]:
        preload()
        return fork_server.serve(argv[1], handle)
    print(json.dumps(handle(json.loads(sys.stdin.read())), ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
