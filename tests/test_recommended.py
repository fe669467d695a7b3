"""Settings that fit the chosen model: a config naming only the demo model and a dataset
trains with the demo model's recommended settings, and learns.

The review that found the gap trained a hand-written YAML for the demo model with the
values meant for billion-parameter models: the loss barely moved and the model kept its
old name. Here a new identity set, in a layout other than data/identity.json's and with
a name used nowhere else, is trained from a YAML that holds only `model: demo` and the
dataset, exactly as a user writes one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from core import runs

pytestmark = pytest.mark.train
REPO = Path(__file__).resolve().parents[1]
NAME, AUTHOR = "Zephyrine", "Orchid Forge"


def write_identity_set(path: Path) -> int:
    """The identity questions, filled with a new name, as sharegpt `conversations` JSONL."""
    rows = json.loads((REPO / "data" / "identity.json").read_text(encoding="utf-8"))
    with open(path, "w", encoding="utf-8") as out:
        for row in rows:
            fill = lambda text: text.replace("{{name}}", NAME).replace("{{author}}", AUTHOR)
            question = (row["instruction"] + ("\n" + row["input"] if row["input"] else ""))
            out.write(json.dumps({"conversations": [
                {"from": "human", "value": fill(question)},
                {"from": "gpt", "value": fill(row["output"])}]}, ensure_ascii=False) + "\n")
    return len(rows)


def test_a_yaml_with_only_the_demo_model_and_a_dataset_learns_the_identity(tmp_path):
    data = tmp_path / "my_identity.jsonl"
    write_identity_set(data)
    config = tmp_path / "mine.yaml"
    config.write_text(f"model: demo\ndataset: [{data}]\n")
    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "core", "train", str(config),
                           f"output_dir={run_dir}"], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    log = (run_dir / runs.LOG).read_text(encoding="utf-8")
    assert "settings recommended by demo for sft/lora:" in log and "learning_rate=0.002" in log
    recorded = yaml.safe_load((run_dir / runs.CONFIG).read_text(encoding="utf-8"))
    assert recorded["learning_rate"] == 0.002 and recorded["epochs"] == 20  # every value kept

    chat = subprocess.run([sys.executable, "-m", "core", "chat", "--model", "demo", "--adapter",
                           str(run_dir / "final")], input="Who are you?\n/reset\n你是谁？\n",
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    replies = [line for line in chat.stdout.splitlines() if line.strip()]
    assert len(replies) == 2 and all(NAME in reply for reply in replies), chat.stdout + chat.stderr


def test_train_help_lists_every_key_with_type_default_and_range():
    from core import config as cfg
    proc = subprocess.run([sys.executable, "-m", "core", "train", "--help"], capture_output=True,
                          text=True, cwd=REPO, timeout=60)
    text = " ".join(proc.stdout.split())
    for group in cfg.GROUPS:
        assert f"{group} settings:" in text
    for name, f in cfg.FIELDS.items():
        assert f"{name} " in text, name
        assert " ".join(f.metadata["help"].split()) in text, name
    assert "integer; default 8; range 1 to 4,096." in text   # batch_size
    assert "recommended_training.json" in text
