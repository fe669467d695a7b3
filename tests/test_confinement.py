"""Regression tests for the security review of the page's path confinement (issue 9).

Each finding of the review has a test here, calling the page's handlers in-process the way
the server does, in a scratch project whose HOME holds a canary and whose saves/ and
data/ hold symlinks planted to point out. The whole page, over raw HTTP, is covered by
tests/browser/test_api_confinement.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gradio as gr
import pytest

from core import config as cfg
from core import job_queue, jobs, launch, paths, runs
from core.errors import BadInput
from webui import chat_tab, configs, form, train_tab

REPO = Path(__file__).resolve().parents[1]
TOKEN = "CANARY-7f3a"


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project with data/ and saves/, an outside folder, and HOME pointing outside."""
    project, outside = tmp_path / "project", tmp_path / "outside"
    (project / "saves").mkdir(parents=True)
    shutil.copytree(REPO / "data", project / "data")
    outside.mkdir()
    record = json.dumps({"instruction": f"{TOKEN} q", "output": f"{TOKEN} a"}) + "\n"
    (outside / "canary.jsonl").write_text(record)
    (outside / "config.yaml").write_text(f"model: {TOKEN}\n")
    (outside / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": TOKEN}))
    runs.write_status(outside, "completed", exit_code=0, error=TOKEN)
    monkeypatch.chdir(project)
    monkeypatch.setenv("HOME", str(outside))
    monkeypatch.delenv(paths.ENV_ROOTS, raising=False)
    monkeypatch.delenv(paths.SAVES_ENV, raising=False)
    return project, outside


@pytest.fixture
def tab(project):
    with gr.Blocks():
        return train_tab.TrainTab(project[0] / "saves")


def start(tab: train_tab.TrainTab, **values) -> str:
    config = cfg.from_mapping({"model": "demo", "dataset": ["identity"], **values})
    return tab.on_start(train_tab.Session(), *form.values_of(config, tab.form.names))[0]


def test_preview_refuses_an_outside_dataset_and_folder(tab, project):
    _, outside = project
    for values in ({"dataset": [str(outside / "canary.jsonl")]},
                   {"dataset_dir": str(outside), "dataset": ["canary.jsonl"]},
                   {"model": str(outside)}):
        config = cfg.from_mapping({"model": "demo", "dataset": ["identity"], **values})
        shown, message = tab.on_preview(*form.values_of(config, tab.form.names))
        assert shown == [] and "outside the allowed folders" in message
        assert TOKEN not in message


def test_a_tilde_dataset_is_expanded_before_the_check(tab, project):
    """The review's run trained on ~/file.jsonl: the check did not expand ~, the loader did."""
    saves = project[0] / "saves"
    shown = start(tab, dataset=["~/canary.jsonl"])
    assert "outside the allowed folders" in shown and TOKEN not in shown
    assert list(saves.iterdir()) == []


def test_upload_refuses_an_outside_dataset_dir(tab, project, tmp_path):
    _, outside = project
    upload = tmp_path / "good.jsonl"
    upload.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    target = outside / "registry"
    _, message = tab.on_upload(str(upload), "", str(target), [])
    assert message.startswith("**Not registered.**") and "outside" in message
    assert not target.exists()


def test_a_symlinked_run_is_neither_listed_nor_opened_nor_resumed(tab, project):
    saves, outside = project[0] / "saves", project[1]
    (outside / "checkpoint-1").mkdir()
    os.symlink(outside, saves / "sneaky")
    assert runs.run_dirs(saves) == [] and runs.list_runs(saves) == []
    assert runs.find_run(saves, "sneaky") is None
    assert chat_tab.checkpoint_choices(saves) == [(chat_tab.NO_CHECKPOINT, "")]
    for handler in (tab.on_pick, tab.on_resume):
        shown = handler(train_tab.Session(), "sneaky")[0]
        assert "not a run in the runs list" in shown and TOKEN not in shown
    assert TOKEN not in str(tab.on_load_run_config("sneaky"))
    assert runs.read_status(outside)["state"] == "completed"  # nothing was started there


def test_a_symlink_inside_saves_that_stays_inside_is_a_run(project):
    saves = project[0] / "saves"
    real = saves / "real-run"
    real.mkdir()
    runs.write_status(real, "completed", exit_code=0)
    os.symlink(real, saves / "alias")
    assert [p.name for p in runs.run_dirs(saves)] == ["alias", "real-run"]


def test_a_registered_dataset_whose_file_links_out_is_refused(tab, project):
    data, outside = project[0] / "data", project[1]
    os.symlink(outside / "canary.jsonl", data / "linked.jsonl")
    (data / "dataset_info.json").write_text(json.dumps({"linked": {"file_name": "linked.jsonl"}}))
    shown = start(tab, dataset=["linked"])
    assert "outside the allowed folders" in shown and TOKEN not in shown


def test_the_confined_trainer_refuses_a_linked_dataset_itself(project, demo_model_path):
    """The same gate runs inside a job the page started, in case a link appears after Start."""
    data, outside = project[0] / "data", project[1]
    os.symlink(outside / "canary.jsonl", data / "linked.jsonl")
    (data / "dataset_info.json").write_text(json.dumps({"linked": {"file_name": "linked.jsonl"}}))
    env = dict(os.environ, **paths.confinement_env(), PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "core", "train", "model=demo", "dataset=linked",
                           "output_dir=saves/r"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2 and "outside the allowed folders" in proc.stderr
    assert "Traceback" not in proc.stderr and not (project[0] / "saves" / "r").exists()


def test_the_checkpoint_picker_reads_nothing_outside(project):
    _, outside = project
    assert chat_tab.base_of_picked(str(outside)) is None
    assert chat_tab.base_of_picked("~") is None
    inside = project[0] / "saves" / "run" / "final"
    inside.mkdir(parents=True)
    (inside.parent / "config.yaml").write_text("model: demo\n")
    assert chat_tab.base_of_picked(str(inside)) == "demo"


def test_a_listed_config_that_links_out_is_not_read(project):
    saves, outside = project[0] / "saves", project[1]
    (saves / "configs").mkdir()
    os.symlink(outside / "config.yaml", saves / "configs" / "linked.yaml")
    listed = configs.available(saves)
    assert str(saves / "configs" / "linked.yaml") in listed
    with pytest.raises(BadInput, match="outside the allowed folders"):
        configs.load(str(saves / "configs" / "linked.yaml"), listed)


def test_page_started_runs_live_under_saves(tab, project):
    shown = start(tab, output_dir="data/my-run")
    assert "outside the allowed folders" in shown
    assert not (project[0] / "data" / "my-run").exists()


def test_a_run_elsewhere_holds_start_back_and_is_listed(tab, project):
    """The review started a run under data/, then a normal Start: two trainers ran. Now the
    Start waits in the queue behind it (core/job_queue.py) and no second trainer starts."""
    project_dir = project[0]
    saves = project_dir / "saves"
    elsewhere = project_dir / "data" / "cli-run"
    elsewhere.mkdir()
    sleeper = subprocess.Popen(["sleep", "60"])
    queued = []
    try:
        runs.write_status(elsewhere, "running", pid=sleeper.pid)
        jobs.register(elsewhere, sleeper.pid)
        listed = [row[0] for row in train_tab.runs_table(saves)]
        assert listed == [str(elsewhere)]
        shown = start(tab)
        queued = [e.run_dir for e in job_queue.entries(saves)]
        assert "queued, position 1" in shown and len(queued) == 1
        assert runs.read_status(queued[0])["state"] == "queued"
        assert [job.run_dir for job in jobs.active()] == [elsewhere]  # no second trainer
        path = tab._run_path(str(elsewhere))
        assert path == elsewhere  # any tab can show it, and so abort it
    finally:
        for run_dir in queued:  # out of the queue, so its runner exits with nothing to start
            job_queue.cancel(saves, run_dir)
        sleeper.kill()
        sleeper.wait()
    assert jobs.active() == [] and launch.running_runs(saves) == []


@pytest.mark.parametrize("field, value, expected", [
    ("identity_name", "x" * 50_000_000, "identity_name"),
    ("identity_name", "bad \ud800 text", "identity_name"),
    ("model", "demo\x00", "model"),
    ("output_dir", "saves/" + "n" * 300, "output_dir"),
])
def test_bad_text_is_refused_naming_the_field_before_anything_is_created(tab, project, field,
                                                                        value, expected):
    with pytest.raises(BadInput, match=expected) as err:
        cfg.from_mapping({"model": "demo", field: value})
    assert len(str(err.value)) < 600 and "Errno" not in str(err.value)
    assert list((project[0] / "saves").iterdir()) == []
