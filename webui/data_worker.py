"""Reading datasets for the page, always in a child process.

The page server never parses a dataset itself. A large or hostile file (a
decompression bomb, a huge JSON document) would grow the server's memory for good,
since CPython rarely hands freed memory back, and a crash inside a parser would
take the page down; tokenizing also needs transformers, which the server never
imports (it costs seconds and hundreds of MB). So Start's data check, an upload's
validation and the preview each run `python -m webui.data_worker` with one JSON
request on stdin; the child prints one JSON answer and exits, and its memory goes
with it. The child inherits the server's environment, confinement included
(core/paths.py), so every path it opens passes the same gate.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

from core import config as cfg
from core.errors import BadInput

TIMEOUT_S = 300        # a hub tokenizer or the first demo-model build can take a while
LENGTH_SAMPLE = 1000   # records measured for the length summary


def ask(action: str, request: dict, timeout: float = TIMEOUT_S) -> dict:
    """Run one action in a child process. Raises BadInput with the child's message."""
    payload = json.dumps({"action": action, **request})
    try:
        proc = subprocess.run([sys.executable, "-m", "webui.data_worker"], input=payload,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BadInput(f"reading the data took longer than {timeout:.0f} s and was "
                       "stopped") from None
    lines = proc.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict):
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise BadInput(f"reading the data failed (exit code {proc.returncode}): {tail}")
    if "error" in answer:
        raise BadInput(answer["error"])
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


def length_summary(lengths: list[int], cutoff: int, total: int) -> dict:
    return {"records": total, "measured": len(lengths), "min": min(lengths),
            "median": statistics.median(lengths), "max": max(lengths),
            "over_cutoff": sum(n > cutoff for n in lengths), "cutoff_len": cutoff}


def _compute(config: cfg.TrainConfig, count: int) -> dict:
    from core import data, models, templates

    records = data.load_records(config)
    if not records:
        raise BadInput("the datasets hold no records", field="dataset")
    tokenizer = models.load_tokenizer(config.model, config.template, config.trust_remote_code)
    shown = []
    for record in records[:count]:
        row = templates.encode_example(record, tokenizer, config.cutoff_len)
        segments = templates.trained_segments(tokenizer, row["input_ids"], row["labels"])
        shown.append({"segments": segments, "tokens": len(row["input_ids"]),
                      "trained": sum(lab != templates.IGNORE for lab in row["labels"])})
    lengths = [len(templates.encode_example(r, tokenizer, 10**9)["input_ids"])
               for r in records[:LENGTH_SAMPLE]]
    return {"examples": shown, "summary": length_summary(lengths, config.cutoff_len,
                                                          len(records))}


def _check(request: dict) -> dict:
    from core import data

    config = cfg.from_mapping(request["config"], source="the form")
    return {"records": len(data.load_records(config))}


def _register(request: dict) -> dict:
    from core import data

    return {"name": data.register_file(request["file"], request["dataset_dir"],
                                       request.get("name"))}


def _preview(request: dict) -> dict:
    config = cfg.from_mapping(request["config"], source="the form")
    return _compute(config, int(request.get("count", 3)))


ACTIONS = {"check": _check, "register": _register, "preview": _preview}


def main() -> int:
    """Child side: read a request on stdin, print one JSON answer on stdout."""
    try:
        request = json.loads(sys.stdin.read())
        answer = ACTIONS[request["action"]](request)
    except BadInput as err:
        answer = {"error": str(err)}
    print(json.dumps(answer, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
