"""lm-evaluation-harness through core/harness.py: the bundled multiple-choice set as a
local task, scored for real on the demo model with and without a LoRA adapter, and
the bad inputs (an answer that is no option, a missing column, an unknown task).

The adapter is made here, untrained (init_lora_weights=False starts it non-zero so it
changes the logits): this checks the plumbing, not what training teaches."""

from __future__ import annotations

import json
import math
import os

import pytest
import yaml

from core import data, harness, models
from core.errors import BadInput

N_DEMO = 40  # questions in data/mc_demo.jsonl
ROW = {"question": "What is 1 + 1?", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "B"}


@pytest.fixture(scope="module")
def mc_demo_task(tmp_path_factory):
    path, records = data.read_choice("mc_demo")
    return harness.choice_task(records, path, tmp_path_factory.mktemp("eval-job"))


@pytest.fixture(scope="module")
def adapter(demo_model_path, tmp_path_factory):
    """A LoRA adapter of the demo model in a run folder whose config names the base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(demo_model_path)
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False, task_type="CAUSAL_LM"))
    run_dir = tmp_path_factory.mktemp("harness") / "lora-run"
    lora.save_pretrained(run_dir / "final")
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": str(demo_model_path),
                                                         "method": "lora"}))
    return run_dir / "final"


def run(model, tokenizer, task, **options):
    name, include = task
    return harness.evaluate(model, tokenizer, [name], include_path=include, batch_size=8,
                            limit=options.pop("limit", None), num_fewshot=0, **options)[name]


def sensible(score: dict, n: int) -> None:
    assert score["n"] == n and 0 <= score["accuracy"] <= 100
    p = score["accuracy"] / 100  # lm_eval: the sample standard deviation over sqrt(n)
    assert math.isclose(score["accuracy_stderr"], 100 * math.sqrt(p * (1 - p) / (n - 1)))


# --- the bundled set --------------------------------------------------------------------

def test_mc_demo_is_registered_for_evaluation_only():
    path, records = data.read_choice("mc_demo")
    assert path.name == "mc_demo.jsonl" and len(records) == N_DEMO
    assert data.read_registry()["mc_demo"]["formatting"] == "choice"
    assert data.dataset_kind("mc_demo") == "choice"
    assert all("mc_demo" not in data.datasets_for_stage(s) for s in data.STAGES)
    letters = [r["answer"] for r in records]
    assert all(letters.count(letter) == N_DEMO // 4 for letter in "ABCD")  # no letter favoured
    identity = [r for r in records if "Tuney" in r["choices"][ord(r["answer"]) - ord("A")]
                or "the tunebench team" in r["choices"][ord(r["answer"]) - ord("A")]]
    assert len(identity) >= 8
    assert any("\u4e00" <= r["question"][0] <= "\u9fff" for r in records)  # some in Chinese
    with pytest.raises(BadInput, match="not training; for stage sft"):
        data.read_dataset("mc_demo", stage="sft")


def test_choice_task_is_a_local_task_file(mc_demo_task):
    name, include = mc_demo_task
    assert name == "tunebench_mc_demo" and include.name == "harness"
    task = yaml.safe_load((include / f"{name}.yaml").read_text(encoding="utf-8"))
    assert task["dataset_path"] == "json" and task["output_type"] == "multiple_choice"
    docs = [json.loads(line) for line in (include / f"{name}.jsonl").open(encoding="utf-8")]
    assert len(docs) == N_DEMO and docs[0]["answer"] == 1  # "B"
    harness.check_tasks([name], include)  # known locally, without indexing lm_eval's tasks


# --- runs through lm-evaluation-harness --------------------------------------------------

def test_mc_demo_runs_for_base_and_fine_tune(mc_demo_task, adapter, demo_model_path):
    tokenizer, model = models.load_checkpoint(str(demo_model_path), adapter, device="cpu")
    calls = []
    tuned = run(model, tokenizer, mc_demo_task, progress=lambda done, total: calls.append(
        (done, total)))
    base = run(model, tokenizer, mc_demo_task, disable_adapter=True)
    sensible(tuned, N_DEMO)
    sensible(base, N_DEMO)
    total = 4 * N_DEMO  # a request per option
    assert calls[-1] == (total, total) and len(calls) == 80  # once a percent, rounded up
    assert [done for done, _ in calls] == sorted({done for done, _ in calls})
    assert run(model, tokenizer, mc_demo_task) == tuned  # the adapter is back on
    _, plain = models.load_checkpoint(str(demo_model_path), device="cpu")
    assert run(plain, tokenizer, mc_demo_task) == base  # the base, not loaded twice
    assert run(plain, tokenizer, mc_demo_task, limit=5)["n"] == 5
    with pytest.raises(ValueError, match="PEFT"):
        run(plain, tokenizer, mc_demo_task, disable_adapter=True)


def test_files_of_one_stem_get_their_own_tasks_and_a_tag_pools_them(tmp_path, demo_model_path):
    job, sources = tmp_path / "job", [tmp_path / "a" / "quiz.csv", tmp_path / "b" / "quiz.csv"]
    rows = [data._choice_record(ROW, 1, data._Source("x")), data._choice_record(
        {**ROW, "question": "What is 2 + 2?", "answer": "D"}, 2, data._Source("x"))]
    names = [harness.choice_task(rows[:k], source, job)[0] for k, source in ((1, sources[0]),
                                                                           (2, sources[1]))]
    assert names == ["tunebench_quiz", "tunebench_quiz_2"]
    assert harness.choice_task(rows[:1], sources[0], job)[0] == "tunebench_quiz"  # rewritten
    include = job / "harness"
    for name in names:  # tagged, as a user's YAML might be
        task_file = include / f"{name}.yaml"
        task_file.write_text(task_file.read_text() + "tag: tunebench_quizzes\n")
    tokenizer, model = models.load_checkpoint(str(demo_model_path), device="cpu")
    scores = harness.evaluate(model, tokenizer, ["tunebench_quizzes", *names],
                              include_path=include, batch_size=8, num_fewshot=0)
    assert list(scores) == ["tunebench_quizzes", *names]
    one, two = scores[names[0]], scores[names[1]]
    assert (one["n"], two["n"], one["accuracy_stderr"]) == (1, 2, None)  # no error of one
    assert scores["tunebench_quizzes"] == {
        "n": 3, "accuracy": (one["accuracy"] + 2 * two["accuracy"]) / 3, "accuracy_stderr": None}


# --- bad input ------------------------------------------------------------------------------

def test_an_answer_that_is_no_option_names_file_record_and_field(tmp_path):
    path = tmp_path / "quiz.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [ROW, {**ROW, "answer": "E"}]))
    with pytest.raises(BadInput) as info:
        data.read_choice(str(path))
    err = info.value
    assert (err.file, err.record, err.field) == (str(path), 2, "answer")
    assert "'E'" in str(err) and "A, B, C or D" in str(err)
    path.write_text(json.dumps({**ROW, "answer": "the second"}) + "\n")
    with pytest.raises(BadInput, match=r"quiz\.jsonl, record 1, field 'answer': is 'the second'"):
        data.read_choice(str(path))


def test_a_missing_column_is_named(tmp_path):
    csv_path = tmp_path / "quiz.csv"
    csv_path.write_text("question,A,B,D,answer\nWhat is 1 + 1?,1,2,4,B\n")
    with pytest.raises(BadInput) as info:
        data.read_choice(str(csv_path))
    assert info.value.file == str(csv_path) and info.value.field == "C"
    assert "no column 'C'" in str(info.value)
    json_path = tmp_path / "quiz.json"
    json_path.write_text(json.dumps([ROW, {k: v for k, v in ROW.items() if k != "C"}]))
    with pytest.raises(BadInput, match=r"quiz\.json, record 2, field 'C': is missing"):
        data.read_choice(str(json_path))
    (tmp_path / "alpaca.json").write_text(json.dumps([{"instruction": "hi", "output": "yo"}]))
    with pytest.raises(BadInput, match="holds alpaca records; expected multiple-choice"):
        data.read_choice(str(tmp_path / "alpaca.json"))


def test_unknown_task_names_the_closest(mc_demo_task):
    with pytest.raises(BadInput) as info:
        harness.check_tasks(["arc_easy", "arc_eazy"])
    message = str(info.value)
    assert info.value.field == "harness_tasks"
    assert message.startswith("field 'harness_tasks': unknown lm-evaluation-harness task "
                              "'arc_eazy'; closest: arc_easy, ")
    assert "tasks exist" in message
    with pytest.raises(BadInput, match="'tunebench_mc_dem'; closest: tunebench_mc_demo"):
        harness.check_tasks(["tunebench_mc_dem"], mc_demo_task[1])


def test_a_hub_task_offline_is_explained(demo_model_path):
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        pytest.skip("needs HF_HUB_OFFLINE=1")
    tokenizer, model = models.load_checkpoint(str(demo_model_path), device="cpu")
    with pytest.raises(BadInput, match="task 'arc_easy' needs its dataset from the Hugging Face "
                                       "Hub; this machine is offline"):
        harness.evaluate(model, tokenizer, ["arc_easy"], batch_size=8, limit=2)


def test_a_task_without_accuracy_is_refused(tmp_path):
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "The cat sleeps."}) + "\n")
    (tmp_path / "ppl.yaml").write_text(yaml.safe_dump({
        "task": "tunebench_ppl", "dataset_path": "json", "test_split": "test",
        "dataset_kwargs": {"data_files": {"test": str(tmp_path / "docs.jsonl")}},
        "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "word_perplexity"}]}))
    with pytest.raises(BadInput, match="'tunebench_ppl' reports word_perplexity"):
        harness.evaluate(None, None, ["tunebench_ppl"], include_path=tmp_path)
