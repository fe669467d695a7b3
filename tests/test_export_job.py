"""An export as a job (core/export_job.py, started by launch.start_export as the Export tab
does): its folder under saves/exports, progress with ETA, the verification result and the
command that reproduces it; a stopped job keeps nothing; refusals before it starts."""

import time

import pytest

from core import export_job, launch, runs
from core.errors import BadInput


def wait_for(condition, timeout=240, what="the job"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def job_for(saves, demo_model_path, name, **settings):
    return export_job.ExportJob(model=str(demo_model_path), out=str(saves / "exports" / name),
                                **settings)


def test_settings_round_trip_and_reproducing_command(tmp_path):
    job = export_job.job_of({"model": "demo", "out": "x", "format": "gguf", "gguf_type": "f16"})
    assert export_job.command_line(job) == ["tunebench", "export", "--model", "demo", "--out",
                                            "x", "--format", "gguf", "--gguf-type", "f16"]
    with pytest.raises(BadInput, match="unknown export setting 'shards'"):
        export_job.job_of({"model": "demo", "out": "x", "shards": 3})
    with pytest.raises(BadInput, match="format"):
        export_job.job_of({"model": "demo", "out": "x", "format": "onnx"})


def test_export_job_folder_progress_result_and_reattach(tmp_path, demo_model_path):
    saves = tmp_path / "saves"
    job = job_for(saves, demo_model_path, "demo-4bit", format="bnb-4bit")
    folder = launch.start_export(job, saves)
    assert folder.parent == (saves / "exports").resolve() and folder.name.startswith(
        "export-bnb-4bit-")
    # while it runs, a page that opens finds it (reattach)
    wait_for(lambda: (runs.read_status(folder) or {}).get("state") != "running" or
             export_job.newest_running(saves) == folder, what="the job to be listed")
    wait_for(lambda: (runs.read_status(folder) or {}).get("state") != "running")
    status = runs.read_status(folder)
    assert status["state"] == "completed" and status["kind"] == "export", \
        (status, launch.log_tail(folder / export_job.LOG))
    assert sorted(p.name for p in folder.iterdir()) == [
        "command.txt", "config.yaml", "export.log", "metrics.jsonl", "result.json",
        "status.json"]
    assert export_job.read_job(folder) == job  # config.yaml reruns it as it is
    assert "export" in (folder / "command.txt").read_text() and str(folder) in \
        (folder / "command.txt").read_text()
    lines = runs.read_metrics(folder)
    steps = [line["step"] for line in lines]
    assert steps == sorted(steps) and steps[-1] == 100 and {l["total_steps"] for l in lines} == {100}
    assert any(line["eta_s"] is not None for line in lines) and all(
        {"elapsed_s", "message"} <= set(line) for line in lines)
    result = export_job.read_result(folder)
    assert result["ok"] and result["verified"] and result["format"] == "bnb-4bit"
    assert result["command"].startswith("tunebench export --model ") and \
        "--format bnb-4bit" in result["command"]
    assert (saves / "exports" / "demo-4bit" / "config.json").is_file()
    assert export_job.newest_running(saves) is None
    assert [j.path for j in export_job.export_jobs(saves)] == [folder]

    # the page draws it from the folder alone
    from webui import export_tab
    shown = export_tab.job_html(folder)
    assert "id='export-result' data-ok='true'" in shown and "nf4 4-bit" in shown
    assert export_tab.job_command(folder) == result["command"]


def test_a_stopped_export_keeps_nothing(tmp_path, demo_model_path):
    saves = tmp_path / "saves"
    job = job_for(saves, demo_model_path, "stopped", format="bnb-8bit")
    folder = launch.start_export(job, saves)
    wait_for(lambda: runs.read_metrics(folder), what="the first progress line")
    final = launch.abort_run(folder)
    assert final["state"] == "aborted", final
    exports = saves / "exports"
    assert sorted(p.name for p in exports.iterdir()) == [folder.name]  # no export, no temp
    assert export_job.read_result(folder) is None


def test_a_failed_export_is_recorded_and_keeps_nothing(tmp_path, demo_model_path):
    saves = tmp_path / "saves"
    job = job_for(saves, demo_model_path, "bad", adapter=str(tmp_path / "missing"))
    folder = launch.start_export(job, saves)
    wait_for(lambda: (runs.read_status(folder) or {}).get("state") != "running")
    status = runs.read_status(folder)
    assert status["state"] == "failed" and status["exit_code"] == 2, status
    assert "not found" in status["error"] and "Traceback" not in status["error"]
    assert sorted(p.name for p in (saves / "exports").iterdir()) == [folder.name]
    from webui import export_tab
    assert "export failed" in export_tab.job_html(folder)


def test_refusals_before_a_job_starts(tmp_path, demo_model_path, monkeypatch):
    import collections
    from core import export
    saves = tmp_path / "saves"
    taken = saves / "exports" / "taken"
    taken.mkdir(parents=True)
    (taken / "config.json").write_text("{}")
    with pytest.raises(BadInput, match="already exists"):
        launch.start_export(job_for(saves, demo_model_path, "taken"), saves)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(export.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 10**6))
    with pytest.raises(BadInput, match="not enough disk space: the gguf export"):
        launch.start_export(job_for(saves, demo_model_path, "big", format="gguf"), saves)
    assert sorted(p.name for p in (saves / "exports").iterdir()) == ["taken"]  # no job folder
