"""Dataset preview: the first records as the model sees them, with trained tokens marked.

Tokenizing needs transformers, which the page server never imports (it would
cost seconds of startup and hundreds of MB, and a crash in it would take the
page down). So `preview()` runs this module as a child process
(`python -m webui.preview`) that prints one JSON object and exits.
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


def preview(config: cfg.TrainConfig, count: int = 3) -> dict:
    """Run the preview in a child process. Raises BadInput with the child's message."""
    request = {"config": cfg.to_dict(config), "count": count}
    try:
        proc = subprocess.run([sys.executable, "-m", "webui.preview"], input=json.dumps(request),
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise BadInput(f"the preview took longer than {TIMEOUT_S} s and was stopped") from None
    lines = proc.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict):
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise BadInput(f"the preview failed (exit code {proc.returncode}): {tail}")
    if "error" in answer:
        raise BadInput(answer["error"])
    return answer


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


def main() -> int:
    """Child side: read a request on stdin, print one JSON answer on stdout."""
    try:
        request = json.loads(sys.stdin.read())
        config = cfg.from_mapping(request["config"], source="the form")
        answer = _compute(config, int(request.get("count", 3)))
    except BadInput as err:
        answer = {"error": str(err)}
    print(json.dumps(answer, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
