"""The Evaluate tab in Chromium, against a real `tunebench webui`.

The used-by story: an identity fine-tune (trained once per session with `tunebench
train`, as the Chat tests do) is evaluated from the page against its base model; the
table shows the fine-tune far ahead on ROUGE-L, the predictions page through, a reload
reattaches, the Train tab marks the job and opens it from the run's view, and bad input
is explained without leaving a job folder behind.
"""

import json
import re
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared run
from page_helpers import choose, open_tab, shot, table_rows, text_of, wait_until  # noqa: E402

import yaml  # noqa: E402

from core import models, runs  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.train]
BAD_CHOICE = ('{"question": "2 + 2?", "A": "3", "B": "4", "C": "5", "D": "6", "answer": "B"}\n'
              '{"question": "Capital of France?", "A": "Paris", "B": "Rome", "C": "Oslo", '
              '"D": "Bern", "answer": "E"}\n')


def eval_dirs(saves: Path) -> list[Path]:
    return sorted(p for p in saves.glob("eval-*") if p.is_dir())


def status_of(page) -> str:
    return text_of(page, "eval-status")


def metric(page, name: str, column: int) -> float:
    """A number in the results table: the row of metric `name`, cell `column` (1 = the
    fine-tune, 2 = the base)."""
    cell = page.locator(f"#eval-results tr[data-metric='{name}'] td").nth(column)
    return float(cell.inner_text().replace("+", "").replace(",", ""))


def prediction_rows(page) -> int:
    return page.locator("#eval-predictions tbody tr").count()


def test_bad_input_is_shown_and_no_job_folder_is_made(page, server):
    (server.project / "data" / "bad_mc.jsonl").write_text(BAD_CHOICE)
    open_tab(page, "Evaluate")
    # An upload with a bad answer is refused where it is uploaded...
    page.click("#eval-data button")
    page.set_input_files("#eval-upload input[type=file]",
                         str(server.project / "data" / "bad_mc.jsonl"))
    wait_until(lambda: "Not registered" in text_of(page, "eval-upload-status"), 30,
               "the upload to be refused")
    assert "record 2" in text_of(page, "eval-upload-status")
    # ...and the same file typed as the dataset is refused by Start, in eval-status.
    choose(page, "eval-task", "choice")
    wait_until(lambda: "mc_demo" in text_of(page, "eval-dataset"), 10,
               "the choice datasets to be offered")
    choose(page, "eval-dataset", "data/bad_mc.jsonl")
    page.click("#eval-start")
    wait_until(lambda: "record 2" in status_of(page), 60, "the refusal")
    text = status_of(page)
    shot(page, "eval-bad-input")
    assert "not started" in text and "bad_mc.jsonl" in text and "answer" in text, text
    assert "'E'" in text and "Traceback" not in text, text
    assert eval_dirs(server.saves) == []


def test_evaluate_a_checkpoint_against_its_base(page, server, run_in_saves):
    open_tab(page, "Evaluate")
    started = time.monotonic()
    choose(page, "eval-checkpoint", "identity/final")
    trained_with = models.run_config(run_in_saves / "final")["model"]
    wait_until(lambda: page.locator("#eval-model input").input_value() == trained_with, 10,
               "the run's model to be filled in")
    assert page.locator("#eval-task input").input_value() == "predict"
    assert "identity" in text_of(page, "eval-dataset")
    page.click("#eval-start")
    new = wait_until(lambda: eval_dirs(server.saves), 60, "a job folder")
    job = new[0]
    wait_until(lambda: job.name in status_of(page), 20, "the page to show the job")
    wait_until(lambda: re.search(r"\d+/68", text_of(page, "eval-progress")) or
               "completed" in status_of(page), 60, "progress")
    shot(page, "eval-running")
    wait_until(lambda: "completed" in status_of(page) or "failed" in status_of(page), 120,
               "the job to end", interval=0.5)
    assert "completed" in status_of(page), status_of(page)
    print(f"\npredict eval of identity/final, from the pick to the table: "
          f"{time.monotonic() - started:.1f} s")
    wait_until(lambda: page.locator("#eval-results tr[data-metric='rouge_l']").count(), 10,
               "the results table")
    tuned, base = metric(page, "rouge_l", 1), metric(page, "rouge_l", 2)
    assert tuned > base + 20, (tuned, base)
    assert "n = 68" in text_of(page, "eval-results")
    assert "100%" in text_of(page, "eval-progress")

    # The predictions, ten to a page.
    wait_until(lambda: prediction_rows(page) == 10, 10, "a page of predictions")
    assert "of 7" in text_of(page, "eval-page-info")
    first = text_of(page, "eval-predictions")
    page.click("#eval-next")
    wait_until(lambda: text_of(page, "eval-predictions") != first, 10, "the next page")
    wait_until(lambda: page.locator("#eval-page input").input_value() == "2", 10,
               "the page number")
    wait_until(lambda: "rows 11–20" in text_of(page, "eval-page-info"), 10, "the rows shown")
    shot(page, "eval-completed")

    # A reload reattaches: the newest job, its table and its predictions.
    page.reload()
    page.wait_for_selector("#train-start")
    open_tab(page, "Evaluate")
    wait_until(lambda: page.locator("#eval-results tr[data-metric='rouge_l']").count(), 20,
               "the table after a reload")
    assert job.name in status_of(page) and metric(page, "rouge_l", 1) == tuned
    assert job.name in text_of(page, "eval-jobs")

    # The Train tab lists the job, marked, and its run's view opens it here.
    open_tab(page, "Train")
    wait_until(lambda: any(r[0] == job.name for r in table_rows(page)), 20, "the runs list")
    assert next(r for r in table_rows(page) if r[0] == job.name)[4] == "eval: predict"
    choose(page, "train-run", "identity")
    wait_until(lambda: job.name in text_of(page, "train-evals"), 20,
               "the run's evaluations")
    assert "rouge_l" in text_of(page, "train-evals")
    shot(page, "eval-train-link")
    page.locator("#train-evals label").filter(has_text=job.name).click()
    wait_until(lambda: page.locator("#eval-start").is_visible(), 10, "the Evaluate tab")
    wait_until(lambda: job.name in status_of(page), 10, "the job opened from the run")


def finished_job(saves: Path, name: str, results: dict) -> Path:
    """A finished eval job folder as `tunebench eval` leaves it (written by hand: the page
    only reads folders, so this saves the test a second job's minute)."""
    folder = saves / name
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "model": "demo", "eval_task": results["task"], "dataset": results["dataset"]}))
    runs.write_status(folder, "completed", pid=1, exit_code=0, kind="eval")
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_two_jobs_compare_only_on_the_same_task_and_data(page, server, run_in_saves):
    """The predict job of the previous test beside another predict job on the same data,
    then beside a loss job: side by side, then refused with the reason."""
    predict = eval_dirs(server.saves)[-1]
    mine = json.loads((predict / "results.json").read_text())
    other = dict(mine, model=dict(mine["model"], rouge_l=mine["model"]["rouge_l"] - 10))
    older = finished_job(server.saves, "eval-predict-older", other)
    loss = finished_job(server.saves, "eval-loss-older", {
        "task": "loss", "n": 68, "model": {"loss": 1.1, "perplexity": 3.0, "tokens": 1651},
        "base": None, "dataset": ["identity"], "model_name": "demo", "adapter": None})
    open_tab(page, "Evaluate")
    wait_until(lambda: older.name in text_of(page, "eval-jobs"), 20, "the jobs list")
    choose(page, "eval-job", predict.name)
    wait_until(lambda: predict.name in status_of(page), 10, "the predict job")
    choose(page, "eval-compare-with", older.name)
    wait_until(lambda: page.locator("#eval-compare tr[data-metric='rouge_l']").count(), 10,
               "the side-by-side table")
    row = page.locator("#eval-compare tr[data-metric='rouge_l'] td").all_inner_texts()
    assert row[3] == "−10.0", row  # B − A: the other job is ten points behind
    shot(page, "eval-compare")
    choose(page, "eval-compare-with", loss.name)
    wait_until(lambda: "Not compared" in text_of(page, "eval-compare"), 10, "the refusal")
    assert "tasks differ (predict and loss)" in text_of(page, "eval-compare")
    shot(page, "eval-compare-refused")
