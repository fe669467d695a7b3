"""`tunebench eval`: real jobs on the demo model and the session's identity fine-tune.

Pinned here: the loss task reports exactly training's eval loss on the same rows; predict
writes every row and scores it (English and Chinese); the fine-tune's ROUGE-L on identity
prompts is far above the base's; probes save their table; a stopped predict keeps what
it did; and bad input fails before any job folder exists.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core import config as cfg
from core import data, evaluate, runs, train
from core.chat import DEFAULT_PROBES
from core.errors import BadInput
from test_chat import ENV, NAME, REPO, identity_run, mismatched_adapter

pytestmark = pytest.mark.train
JOB_FILES = {"config.yaml", "command.txt", "status.json", "eval.log", "metrics.jsonl",
             "results.json"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, demo_model_path):
    return identity_run(tmp_path_factory.getbasetemp(), demo_model_path)


def eval_cli(cwd: Path, *overrides: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "core", "eval", *overrides], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def only_job(cwd: Path) -> Path:
    jobs = [p for p in (cwd / "saves").iterdir() if p.is_dir()]
    assert len(jobs) == 1, jobs
    return jobs[0]


def in_process(cwd: Path, *overrides: str) -> int:
    """`tunebench eval` in this process (faster: torch is already imported)."""
    old = Path.cwd()
    os.chdir(cwd)
    try:
        return evaluate.main(None, [f"dataset_dir={REPO / 'data'}", *overrides])
    finally:
        os.chdir(old)


# --- loss ------------------------------------------------------------------------------

def test_loss_is_training_eval_loss_on_the_same_rows(tmp_path, demo_model_path):
    """Train with a held-out split, then evaluate a checkpoint on those rows, batched
    differently: the same figure (both weight every trained token equally)."""
    run = tmp_path / "small"
    proc = subprocess.run([sys.executable, "-m", "core", "train", f"model={demo_model_path}",
                           f"output_dir={run}", f"dataset_dir={REPO / 'data'}", "epochs=2",
                           "val_size=0.2", "batch_size=4"], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    config = cfg.load(run / "config.yaml")
    _, held = train.split_eval(data.load_records(config), config.val_size, config.seed)
    held_file = tmp_path / "held.jsonl"
    held_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in held))
    evals = {r["step"]: r["eval_loss"] for r in runs.read_metrics(run) if "eval_loss" in r}
    step = max(s for s in evals if (run / f"checkpoint-{s}").is_dir())
    assert in_process(tmp_path, "eval_task=loss", f"dataset={held_file}", "batch_size=3",
                      f"adapter={run / f'checkpoint-{step}'}") == 0
    results = evaluate.read_results(only_job(tmp_path))
    assert results["n"] == len(held) and results["base"] is not None
    assert results["model"]["loss"] == pytest.approx(evals[step], abs=1e-5)
    assert results["model"]["perplexity"] == pytest.approx(2.718281828 ** evals[step], rel=1e-4)
    assert results["base"]["loss"] > results["model"]["loss"]  # training lowered it


# --- predict -----------------------------------------------------------------------------

def test_identity_fine_tune_predicts_far_better_than_its_base(tmp_path, run_dir):
    """The CLI as a user runs it: every row written, scored on both sides, and the folder
    holds what SPEC lists; the run's identity settings are taken from its config."""
    proc = eval_cli(tmp_path, f"adapter={run_dir / 'final'}", f"dataset_dir={REPO / 'data'}",
                    "max_new_tokens=48")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    job = only_job(tmp_path)
    assert JOB_FILES | {"predictions.jsonl"} <= {p.name for p in job.iterdir()}
    status = runs.read_status(job)
    assert status["state"] == "completed" and status["kind"] == "eval"
    config = cfg.eval_config(runs_yaml(job))
    assert config.identity_name == NAME and config.eval_task == "predict"
    results = evaluate.read_results(job)
    rows = evaluate.read_predictions(job)
    identity = data.read_dataset("identity", str(REPO / "data"))[0]
    assert results["n"] == len(rows) == len(identity)
    assert sorted(r["index"] for r in rows) == list(range(len(identity)))
    for row in rows:
        assert {"prompt", "reference", "prediction", "base_prediction", "scores"} <= set(row)
        assert NAME in row["reference"] or "Tuney" in row["reference"]
    model, base = results["model"], results["base"]
    assert set(model) == {"bleu_4", "rouge_1", "rouge_2", "rouge_l", "exact_match"}
    assert model["rouge_l"] > base["rouge_l"] + 25, results
    assert model["bleu_4"] > base["bleu_4"]
    progress = runs.read_metrics(job)
    assert progress[-1]["step"] == progress[-1]["total_steps"] == len(identity)
    assert all("eta_s" in line for line in progress)


def runs_yaml(folder: Path) -> dict:
    import yaml
    return yaml.safe_load((folder / "config.yaml").read_text())


def test_chinese_predictions_are_scored_by_words(tmp_path, run_dir):
    """Chinese identity prompts: the replies are Chinese, and ROUGE sees their words (a
    scorer that drops non-Latin text would give 0 on both sides)."""
    records = data.read_dataset("identity", str(REPO / "data"), identity=(NAME, "the team"))[0]
    chinese = [r for r in records if any("\u4e00" <= ch <= "\u9fff"
                                         for ch in r["messages"][-1]["content"])]
    assert len(chinese) >= 5
    file = tmp_path / "zh.jsonl"
    file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chinese))
    assert in_process(tmp_path, f"adapter={run_dir / 'final'}", f"dataset={file}",
                      "max_new_tokens=48") == 0
    job = only_job(tmp_path)
    results, rows = evaluate.read_results(job), evaluate.read_predictions(job)
    assert results["n"] == len(rows) == len(chinese)
    assert any("\u4e00" <= ch <= "\u9fff" for r in rows for ch in r["prediction"])
    assert results["model"]["rouge_l"] > 20 and results["model"]["rouge_1"] > 20
    assert results["model"]["rouge_l"] > results["base"]["rouge_l"]


def test_probes_job_saves_the_probe_table(tmp_path, run_dir):
    assert in_process(tmp_path, f"adapter={run_dir / 'final'}", "eval_task=probes",
                      "max_new_tokens=40") == 0
    job = only_job(tmp_path)
    table = json.loads((job / "probes.json").read_text())
    assert [r["prompt"] for r in table["rows"]] == list(DEFAULT_PROBES)
    assert all(r["fine_tuned"] and r["base"] is not None for r in table["rows"])
    results = evaluate.read_results(job)
    assert results["model"]["mentions_name"] > results["base"]["mentions_name"]


def test_a_stopped_predict_keeps_the_rows_it_did(tmp_path, run_dir):
    proc = subprocess.Popen([sys.executable, "-m", "core", "eval", f"adapter={run_dir / 'final'}",
                             f"dataset_dir={REPO / 'data'}", "batch_size=1",
                             "max_new_tokens=48"], cwd=tmp_path, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(tmp_path.glob("saves/*/predictions.jsonl")):
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 1
    job = only_job(tmp_path)
    status, results = runs.read_status(job), evaluate.read_results(job)
    assert status["state"] == "aborted" and "stopped by the user" in status["error"]
    rows = evaluate.read_predictions(job)
    assert results["partial"] is True and 0 < results["n"] == len(rows) < 68
    assert results["model"]["rouge_l"] > 0


# --- multiple choice through lm-evaluation-harness ------------------------------------------

def test_the_bundled_choice_set_runs_through_the_harness_for_both_sides(tmp_path, run_dir):
    questions = len(data.read_choice("mc_demo", str(REPO / "data"))[1])
    assert in_process(tmp_path, f"adapter={run_dir / 'final'}", "eval_task=choice",
                      "dataset=mc_demo") == 0
    job = only_job(tmp_path)
    results = evaluate.read_results(job)
    assert results["n"] == questions
    for side in ("model", "base"):
        assert set(results[side]) == {"accuracy", "accuracy_stderr"}
        assert 0 <= results[side]["accuracy"] <= 100
        # a binomial standard error of a share near chance over ~40 questions: 5 to 9 points
        assert 3 < results[side]["accuracy_stderr"] < 10, results
    (task,) = results["tasks"]
    assert results["tasks"][task]["n"] == questions
    assert (job / "harness" / f"{task}.yaml").is_file()
    assert runs.read_metrics(job)[-1]["step"] == 2  # one task, two sides


# --- bad input: named, and no job folder ---------------------------------------------------

def refused(tmp_path: Path, *overrides: str) -> str:
    with pytest.raises(BadInput) as err:
        in_process(tmp_path, *overrides)
    assert not (tmp_path / "saves").exists(), "a job folder was made for bad input"
    return str(err.value)


def test_a_conversation_without_a_reference_is_refused(tmp_path):
    file = tmp_path / "open.jsonl"
    file.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n" +
                    json.dumps({"messages": [{"role": "user", "content": "and then?"}]}) + "\n")
    message = refused(tmp_path, f"dataset={file}")
    assert str(file) in message and "record 2" in message and "messages" in message, message
    assert "must end with the assistant's reply" in message


def test_a_plain_text_dataset_cannot_be_predicted(tmp_path):
    message = refused(tmp_path, "dataset=text_demo")
    assert "text dataset" in message and "dataset" in message


def test_an_adapter_for_another_base_is_refused(tmp_path, demo_model_path):
    adapter = mismatched_adapter(tmp_path, demo_model_path)
    message = refused(tmp_path, f"adapter={adapter}", f"model={demo_model_path}")
    assert "does not fit the base model" in message and str(adapter) in message


def test_a_choice_file_with_a_wrong_answer_is_refused(tmp_path):
    file = tmp_path / "quiz.jsonl"
    row = {"question": "2 + 2?", "A": "3", "B": "4", "C": "5", "D": "6", "answer": "B"}
    file.write_text(json.dumps(row) + "\n" + json.dumps({**row, "answer": "E"}) + "\n")
    message = refused(tmp_path, "eval_task=choice", f"dataset={file}")
    assert "record 2" in message and "field 'answer'" in message and "A, B, C or D" in message


def test_a_choice_file_missing_a_column_is_refused(tmp_path):
    file = tmp_path / "quiz.csv"
    file.write_text("question,A,B,D,answer\n2 + 2?,3,4,6,B\n")
    message = refused(tmp_path, "eval_task=choice", f"dataset={file}")
    assert "field 'C'" in message and str(file) in message


def test_an_unknown_harness_task_names_the_closest(tmp_path):
    message = refused(tmp_path, "eval_task=harness", "harness_tasks=arc_eazy")
    assert "arc_eazy" in message and "closest: arc_easy" in message


def test_the_cli_says_bad_input_in_one_line(tmp_path):
    proc = eval_cli(tmp_path, "eval_task=harness")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "harness_tasks" in proc.stderr
    assert not (tmp_path / "saves").exists()
