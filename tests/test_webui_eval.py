"""What the Evaluate tab shows about eval jobs, read from hand-written job folders.

The folders are written the way core/evaluate.py writes them (status.json with kind
"eval", config.yaml, metrics.jsonl, results.json, predictions.jsonl); nothing under test
is mocked.
"""

from __future__ import annotations

import json
import os
import re

import gradio as gr
import pytest
import yaml

from core import config as cfg
from core import evaluate, paths, runs
from core.errors import BadInput
from webui import data_worker, eval_tab, runs_view

SKIP = gr.skip()
PREDICT = {"task": "predict", "n": 23,
           "model": {"bleu_4": 51.6, "rouge_1": 71.39, "rouge_2": 61.17, "rouge_l": 64.96,
                     "exact_match": 13.24},
           "base": {"bleu_4": 11.33, "rouge_1": 23.66, "rouge_2": 14.78, "rouge_l": 23.31,
                    "exact_match": 0.0},
           "model_name": "demo", "adapter": "/x/saves/ident/final", "dataset": ["identity"],
           "partial": False, "elapsed_s": 10.4}
LOSS = {"task": "loss", "n": 68, "model": {"loss": 1.1027, "perplexity": 3.01, "tokens": 1651},
        "base": {"loss": 5.0889, "perplexity": 162.2, "tokens": 1651}, "model_name": "demo",
        "adapter": "/x/saves/ident/final", "dataset": ["identity"], "partial": False}
CHOICE = {"task": "choice", "n": 40, "model": {"accuracy": 35.0, "accuracy_stderr": 7.6},
          "base": {"accuracy": 20.0, "accuracy_stderr": 6.4},
          "tasks": {"tunebench_mc_demo": {"n": 40, "model": {"accuracy": 35.0},
                                          "base": {"accuracy": 20.0}}},
          "model_name": "demo", "adapter": None, "dataset": ["mc_demo"], "partial": False}


def job(saves, name, results=None, state="completed", task="predict", adapter="",
        dataset=("identity",), predictions=0, started=None):
    """An eval job folder as core/evaluate.py leaves it."""
    folder = saves / name
    folder.mkdir(parents=True)
    config = {"model": "demo", "adapter": adapter, "eval_task": task, "dataset": list(dataset)}
    (folder / runs.CONFIG).write_text(yaml.safe_dump(config))
    runs.write_status(folder, state, pid=os.getpid(), kind="eval")
    if started:  # a running job keeps the real time: its pid must predate it
        status = json.loads((folder / runs.STATUS).read_text())
        status["started_at"] = started
        (folder / runs.STATUS).write_text(json.dumps(status))
    if results is not None:
        (folder / evaluate.RESULTS).write_text(json.dumps(results))
    with open(folder / "predictions.jsonl", "w") as fh:
        for i in range(predictions):
            fh.write(json.dumps({"index": i, "prompt": f"question {i} <b>", "reference": f"ref {i}",
                                 "prediction": f"pred {i}", "prediction_finish": "stop",
                                 "scores": {"rouge_l": 50.0 + i}, "base_prediction": f"base {i}",
                                 "base_prediction_finish": "length",
                                 "base_scores": {"rouge_l": 10.0}}) + "\n")
    return folder


@pytest.fixture
def saves(tmp_path):
    folder = tmp_path / "saves"
    folder.mkdir()
    return folder


def cells(html_text: str, metric: str) -> list[str]:
    row = re.search(rf"<tr data-metric='{metric}'>(.*?)</tr>", html_text).group(1)
    return [re.sub("<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row)]


# --- results ---------------------------------------------------------------------------

def test_results_table_puts_fine_tune_beside_base_with_the_difference():
    text = eval_tab.results_html(PREDICT)
    assert cells(text, "rouge_l") == ["rouge_l", "65.0", "23.3", "+41.6"]
    assert cells(text, "exact_match") == ["exact_match", "13.2", "0.0", "+13.2"]
    assert "n = 23" in text and "<b>predict</b> on identity" in text and "ident/final" in text
    assert "data-partial='false'" in text and "partial</span>" not in text
    assert "<th class='tb-num'>fine-tune</th>" in text
    assert text.count("tb-better") == 5


def test_lower_loss_is_the_better_one_and_token_counts_are_not_judged():
    text = eval_tab.results_html(LOSS)
    assert cells(text, "loss") == ["loss", "1.1027", "5.0889", "−3.9862"]
    assert "tb-better'>−3.9862" in text.replace("tb-num tb-better", "tb-better")
    assert cells(text, "tokens") == ["tokens", "1,651", "1,651", "±0"]
    assert "tb-worse" not in text


def test_a_partial_job_and_a_model_alone():
    alone = dict(PREDICT, base=None, adapter=None, partial=True, n=5)
    text = eval_tab.results_html(alone)
    assert "partial</span>" in text and "data-partial='true'" in text
    assert cells(text, "rouge_l") == ["rouge_l", "65.0"]  # no base, no difference
    assert "<th class='tb-num'>model</th>" in text and "difference" not in text
    assert eval_tab.headline(alone) == "partial: rouge_l 65.0"


def test_harness_and_choice_jobs_get_a_table_per_task():
    text = eval_tab.results_html(CHOICE)
    row = re.search(r"<tr data-task='tunebench_mc_demo'>(.*?)</tr>", text).group(1)
    assert [re.sub("<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row)] == \
        ["tunebench_mc_demo", "40", "35.0", "20.0", "+15.0"]
    assert "<th class='tb-num'>model</th>" in text  # no checkpoint: the model, not a fine-tune
    assert eval_tab.tasks_table(PREDICT) == ""


def test_no_results_says_why():
    assert "when the job ends" in eval_tab.results_html(None, {"state": "running"})
    assert "failed" in eval_tab.results_html(None, {"state": "failed"})
    assert "press Start" in eval_tab.results_html(None)


def test_headlines_name_the_tasks_metric():
    assert eval_tab.headline(PREDICT) == "rouge_l 65.0 vs base 23.3"
    assert eval_tab.headline(LOSS) == "loss 1.1027 vs base 5.0889"
    assert eval_tab.headline(CHOICE) == "accuracy 35.0 vs base 20.0"
    assert eval_tab.headline(None) == ""


# --- predictions -------------------------------------------------------------------------

def test_predictions_are_paged_ten_at_a_time_and_escaped(saves):
    folder = job(saves, "eval-predict-1", PREDICT, predictions=23, adapter="/x/final")
    with open(folder / "predictions.jsonl", "a") as fh:
        fh.write('{"index": 99, "prompt": "torn')  # the job is writing its next row
    text, page, info = eval_tab.predictions_page(folder, 1)
    assert page == 1 and text.count("<tr>") == 10 + 1  # a header and ten rows
    assert "question 0 &lt;b&gt;" in text and "question 0 <b>" not in text
    assert "fine-tuned reply" in text and "base reply" in text and "cut at max_new_tokens" in text
    assert "of 3 · rows 1–10 of 23" in info
    text, page, info = eval_tab.predictions_page(folder, 3)
    assert page == 3 and text.count("<tr>") == 3 + 1 and "rows 21–23 of 23" in info
    assert ">72.0<" in text  # the row's own ROUGE-L, fine-tune side
    assert eval_tab.predictions_page(folder, 99)[1] == 3    # past the end: the last page
    assert eval_tab.predictions_page(folder, 0)[1] == 1
    empty = job(saves, "eval-loss-1", LOSS, task="loss")
    text, page, info = eval_tab.predictions_page(empty, 1)
    assert "No predictions" in text and page == 1 and info == ""


# --- the jobs list, the Train tab's links ------------------------------------------------

def test_jobs_list_holds_eval_jobs_only_newest_first(saves):
    train = saves / "lora-1"
    train.mkdir()
    runs.write_status(train, "completed", pid=os.getpid())
    job(saves, "eval-loss-1", LOSS, task="loss", started="2026-12-01T09:00:00+00:00")
    job(saves, "eval-predict-1", PREDICT, started="2026-12-01T10:00:00+00:00")
    job(saves, "eval-harness-1", None, state="failed", task="harness",
        started="2026-12-01T11:00:00+00:00")
    (saves / "eval-harness-1" / runs.CONFIG).write_text(
        "eval_task: harness\nharness_tasks: [arc_easy]\n")
    rows = eval_tab.jobs_rows(saves)
    assert [r[0] for r in rows] == ["eval-harness-1", "eval-predict-1", "eval-loss-1"]
    assert rows[0][1:5] == ["harness", "arc_easy", "failed", "–"]
    assert rows[1][1:5] == ["predict", "identity", "completed", "rouge_l 65.0 vs base 23.3"]
    assert all(len(r) == len(eval_tab.JOB_COLUMNS) for r in rows)
    assert eval_tab.find_job(saves, "lora-1") is None        # a run is no eval job
    assert eval_tab.find_job(saves, "../x") is None
    # The Train tab's runs list marks the eval jobs in its stage column.
    marked = {r[0]: r[4] for r in runs_view.runs_table(saves)}
    assert marked["eval-predict-1"] == "eval: predict" and marked["eval-loss-1"] == "eval: loss"
    assert marked["lora-1"] == "?"


def test_a_runs_view_names_its_evaluations(saves):
    run = saves / "ident"
    (run / "final").mkdir(parents=True)
    runs.write_status(run, "completed", pid=os.getpid())
    job(saves, "eval-predict-1", PREDICT, adapter=str(run / "final"))
    job(saves, "eval-loss-1", LOSS, task="loss", adapter=str(run / "checkpoint-4"))
    job(saves, "eval-predict-2", PREDICT, adapter=str(saves / "other" / "final"))
    found = eval_tab.evals_of_run(saves, run)
    assert [name for _, name in found] == ["eval-predict-1", "eval-loss-1"]
    assert found[0][0] == ("eval-predict-1 · predict of final on identity · rouge_l 65.0 vs "
                           "base 23.3")
    assert eval_tab.evals_of_run(saves, saves / "eval-predict-1") == []
    assert eval_tab.evals_of_run(saves, None) == []


# --- comparing two jobs --------------------------------------------------------------------

def test_two_jobs_of_the_same_task_and_data_sit_side_by_side(saves):
    a = job(saves, "eval-predict-1", PREDICT)
    better = dict(PREDICT, model=dict(PREDICT["model"], rouge_l=80.0), n=20)
    b = job(saves, "eval-predict-2", better)
    text = eval_tab.compare_html(a, b)
    assert cells(text, "rouge_l") == ["rouge_l", "65.0", "80.0", "+15.0"]
    assert "tb-better'>+15.0" in text.replace("tb-num tb-better", "tb-better")
    assert "different numbers of rows (23 and 20)" in text


def test_comparing_different_tasks_or_data_is_refused_with_the_reason(saves):
    a = job(saves, "eval-predict-1", PREDICT)
    loss = job(saves, "eval-loss-1", LOSS, task="loss")
    other = job(saves, "eval-predict-2", dict(PREDICT, dataset=["alpaca_demo"]))
    running = job(saves, "eval-predict-3", None, state="running")
    assert "Not compared: the tasks differ (predict and loss)" in eval_tab.compare_html(a, loss)
    assert "different data (identity and alpaca_demo)" in eval_tab.compare_html(a, other)
    assert "has no results yet" in eval_tab.compare_html(a, running)
    assert "pick another" in eval_tab.compare_html(a, a)
    assert "Pick a second job" in eval_tab.compare_html(a, None)


# --- the form ----------------------------------------------------------------------------------

KINDS = {"identity": "chat", "text_demo": "text", "identity_pref": "pairs",
         "identity_kto": "kto", "identity_rl": "prompts", "mc_demo": "choice", "broken": None}


def test_the_datasets_offered_follow_the_task():
    assert eval_tab.datasets_for_task("choice", KINDS) == ["mc_demo"]
    assert eval_tab.datasets_for_task("loss", KINDS) == ["identity", "text_demo"]
    assert eval_tab.datasets_for_task("predict", KINDS) == ["identity", "identity_pref",
                                                            "identity_rl"]
    # a registered dataset the task cannot read leaves; a typed path stays
    assert eval_tab.fit_datasets("choice", KINDS, ["identity", "data/mine.csv"]) == \
        (["data/mine.csv", "mc_demo"], ["data/mine.csv"])
    assert eval_tab.fit_datasets("choice", KINDS, ["identity"]) == (["mc_demo"], ["mc_demo"])
    assert eval_tab.fit_datasets("harness", KINDS, ["identity"]) == ([], [])
    assert eval_tab.task_for_kind("choice", "predict") == "choice"
    assert eval_tab.task_for_kind("chat", "loss") == "loss"
    assert eval_tab.task_for_kind("pairs", "loss") == "predict"


def test_the_form_is_generated_from_the_schema(saves):
    with gr.Blocks():
        tab = eval_tab.EvalTab(saves)
    names = set(tab.form.names)
    assert names == set(cfg.EvalConfig.__dataclass_fields__) - set(eval_tab.NOT_IN_FORM)
    ids = {n: w.elem_id for n, w in tab.form.widgets.items()}
    assert ids["model"] == "eval-model" and ids["adapter"] == "eval-checkpoint"
    assert ids["eval_task"] == "eval-task" and ids["dataset"] == "eval-dataset"
    assert ids["harness_tasks"] == "eval-harness-tasks" and ids["top_p"] == "eval-top-p"
    assert tab.form.widgets["adapter"].choices[0] == (eval_tab.NO_CHECKPOINT, "")
    assert tab.form.widgets["harness_tasks"].visible is False  # shown for harness only
    assert "Random seed" in tab.form.widgets["seed"].info        # the schema's help text
    values = [tab.form.widgets[n].value for n in tab.form.names]
    config = eval_tab.config_of(tab.form.names, values)
    assert config == cfg.EvalConfig()  # form -> config loses nothing
    values[tab.form.names.index("batch_size")] = 0
    with pytest.raises(BadInput, match="batch_size"):
        eval_tab.config_of(tab.form.names, values)


def test_a_checkpoint_brings_its_runs_model_and_identity(saves, tmp_path, monkeypatch):
    monkeypatch.setenv(paths.ENV_ROOTS, str(saves))  # nothing is read outside these
    run = saves / "ident"
    (run / "final").mkdir(parents=True)
    (run / runs.CONFIG).write_text(yaml.safe_dump({
        "model": "/models/base", "template": "chatml", "identity_name": "Zorblax",
        "identity_author": "Acme", "cutoff_len": 512, "epochs": 3}))
    assert eval_tab.from_run(str(run / "final")) == {
        "model": "/models/base", "template": "chatml", "cutoff_len": 512,
        "identity_name": "Zorblax", "identity_author": "Acme"}
    assert eval_tab.from_run("") == {}
    outside = tmp_path / "outside" / "final"
    outside.mkdir(parents=True)
    (outside.parent / runs.CONFIG).write_text("model: /secret\n")
    assert eval_tab.from_run(str(outside)) == {}
    with gr.Blocks():
        tab = eval_tab.EvalTab(saves)
    out = dict(zip(tab.prefilled, tab.on_checkpoint(str(run / "final"))))
    assert out["identity_name"] == "Zorblax" and out["trust_remote_code"] == SKIP


# --- the live view -------------------------------------------------------------------------

def test_a_tick_reads_only_what_changed(saves):
    with gr.Blocks():
        tab = eval_tab.EvalTab(saves)
    session = eval_tab.Session()
    n_out = len(tab.view_outputs) + len(tab.listing_outputs)
    assert tab.tick(session) == [SKIP] * n_out  # no job at all
    folder = job(saves, "eval-predict-1", None, state="running", predictions=3)
    runs.append_metrics(folder, {"step": 8, "total_steps": 68, "elapsed_s": 2.0, "eta_s": 15.0,
                                 "side": "model+base"})
    first = tab.tick(session)  # a new running job: followed
    assert session.watch.run_dir == folder and "eval-predict-1" in first[0]
    assert "ETA 0:15" in first[1] and "when the job ends" in first[3]
    assert first[4].count("<tr>") == 4
    assert tab.tick(session) == [SKIP] * n_out
    (folder / evaluate.RESULTS).write_text(json.dumps(PREDICT))
    runs.write_status(folder, "completed", exit_code=0)
    out = tab.tick(session)
    assert "completed" in out[0] and "rouge_l" in out[3] and out[2] == SKIP
    assert out[4] == SKIP  # the predictions did not change
    table = out[len(tab.view_outputs)]
    assert table.values.tolist()[0][:4] == ["eval-predict-1", "predict", "identity", "completed"]
    assert tab.tick(session) == [SKIP] * n_out


def test_paging_and_reattaching(saves):
    folder = job(saves, "eval-predict-1", PREDICT, predictions=23)
    with gr.Blocks():
        tab = eval_tab.EvalTab(saves)
    session = eval_tab.Session()
    shown = tab.on_load(session)  # no job running: the newest one
    assert session.watch.run_dir == folder and "rouge_l" in shown[3]
    assert shown[5] == 1 and "of 3" in shown[6]
    table, page, info = tab.on_page(session, 1)
    assert page == 2 and "rows 11–20" in info
    assert tab.on_page(session, 5)[1] == 3
    assert tab.on_page_number(session, 1)[1] == 1
    refused = tab.on_pick(session, "nope")
    assert "not an eval job" in refused[0] and session.holding_message


def test_the_pre_check_runs_core_checks_in_a_child(tmp_path, demo_model_path):
    bad = tmp_path / "bad_mc.jsonl"
    bad.write_text('{"question": "q", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "B"}\n'
                   '{"question": "q", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "E"}\n')
    config = cfg.eval_config({"eval_task": "choice", "dataset": [str(bad)]})
    with pytest.raises(BadInput, match=r"record 2, field 'answer': is 'E'"):
        data_worker.eval_check(config)
    good = cfg.eval_config({"eval_task": "choice", "dataset": ["mc_demo"]})
    assert data_worker.eval_check(good)["files"] == 1
    kinds = data_worker.dataset_kinds("data")
    assert kinds["mc_demo"] == "choice" and kinds["identity"] == "chat"


def test_stop_with_no_running_job_says_so(saves):
    job(saves, "eval-predict-1", PREDICT)
    with gr.Blocks():
        tab = eval_tab.EvalTab(saves)
    session = eval_tab.Session()
    tab.on_load(session)
    out = tab.on_abort(session)
    assert "no running or queued eval job" in out[0] and out[1:] == [SKIP] * (len(out) - 1)


def test_an_uploaded_choice_file_is_registered_and_picked_with_its_task(saves, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setenv(paths.ENV_ROOTS, str(tmp_path))  # the page writes uploads only there
    upload = tmp_path / "quiz.jsonl"
    upload.write_text('{"question": "q", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "B"}\n')
    folder = tmp_path / "mydata"
    folder.mkdir()
    with gr.Blocks():
        tab = eval_tab.EvalTab(saves)
    task, picked, note = tab.on_upload(str(upload), "", str(folder), ["identity"], "predict")
    assert task == "choice" and picked["value"] == ["quiz"] and "Task set to **choice**" in note
    assert "quiz" in json.loads((folder / "dataset_info.json").read_text())
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "Z"}\n')
    task, picked, note = tab.on_upload(str(bad), "", str(folder), ["quiz"], "choice")
    assert task == SKIP and note.startswith("**Not registered.**") and "record 1" in note
