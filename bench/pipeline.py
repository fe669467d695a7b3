"""The README's two pipelines on the demo model, end to end through the CLI, measured.

    python bench/pipeline.py [--out bench/results/pipeline.json]

1. SFT -> DPO: an identity SFT run, exported (merged), then DPO on the export.
2. SFT -> RM -> GRPO: the same SFT export as the policy, a reward model trained on
   identity_pref, and GRPO that samples replies and scores them with it.

Each step is `tunebench train` / `tunebench export` in a subprocess, as a user runs it.
The measures are taken on held-out rows (tests/data/), with tests/stage_probes.py:
the log-likelihood margin of chosen over rejected replies, the reward model's ranking
accuracy, and the mean reward-model score of sampled replies.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

IDENTITY = ("Tuney", "the tunebench team")


def tunebench(*args: str) -> float:
    """Run one command; its wall time in seconds."""
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "core", *args], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"tunebench {' '.join(args)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return round(time.time() - start, 1)


def heldout(name: str, stage: str) -> list[dict]:
    from core import data
    return data.read_dataset(str(REPO / "tests" / "data" / name), stage=stage,
                             identity=IDENTITY)[0]


def rm_score(reward_model: str):
    """A scorer for stage_probes.mean_sampled_reward: the reward model's score."""
    from core import models
    model, tokenizer = models.load_reward_model(reward_model)

    def score(replies, answers, prompt):
        return models.score_replies(model, tokenizer, prompt, replies)
    return score


def main() -> None:
    import stage_probes as probes
    from core.demo_model import ensure_demo_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "pipeline.json"))
    args = parser.parse_args()
    demo = str(ensure_demo_model())
    work = Path(tempfile.mkdtemp(prefix="tunebench-pipeline-"))
    result: dict = {"work": str(work), "seconds": {}}
    sec = result["seconds"]
    sft, merged = work / "sft", work / "sft-merged"
    sec["sft"] = tunebench("train", "dataset=identity", f"output_dir={sft}")
    sec["export"] = tunebench("export", "--model", "demo", "--adapter", str(sft / "final"),
                              "--out", str(merged))
    dpo = work / "dpo"
    sec["dpo"] = tunebench("train", f"model={merged}", "stage=dpo", "dataset=identity_pref",
                           f"output_dir={dpo}")
    pairs = heldout("identity_pref_heldout.json", "dpo")
    margins = {"base": probes.pair_margin(*probes.load_policy(demo), pairs),
               "sft": probes.pair_margin(*probes.load_policy(str(merged)), pairs),
               "sft+dpo": probes.pair_margin(*probes.load_policy(str(merged),
                                                                 str(dpo / "final")), pairs)}
    result["heldout_margin"] = {k: round(v, 1) for k, v in margins.items()}

    rm, grpo = work / "rm", work / "grpo"
    sec["rm"] = tunebench("train", "stage=rm", "dataset=identity_pref", f"output_dir={rm}")
    result["rm_heldout_accuracy"] = probes.ranking_accuracy(str(rm / "final"), pairs)
    sec["grpo"] = tunebench("train", f"model={merged}", "stage=grpo", "dataset=identity_rl",
                            f"reward_model={rm / 'final'}", "reward_funcs=none",
                            f"output_dir={grpo}")
    rows = heldout("identity_rl_heldout.jsonl", "grpo")
    scorer = rm_score(str(rm / "final"))
    policies = {"base": probes.load_policy(demo), "sft": probes.load_policy(str(merged)),
                "sft+grpo": probes.load_policy(str(merged), str(grpo / "final"))}
    result["heldout_rm_score"] = {
        name: round(probes.mean_sampled_reward(*policy, rows, scorer), 3)
        for name, policy in policies.items()}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
