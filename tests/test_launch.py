"""core.launch: background runs that outlive their launcher, refuse company, and abort cleanly.

The `train`-marked tests start the real `tunebench train` on the demo model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core import config as cfg
from core import launch, runs
from core.errors import BadInput

REPO = Path(__file__).resolve().parent.parent
DATA = str(REPO / "data")


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def last_step(run_dir: Path) -> int:
    records = runs.read_metrics(run_dir)
    return records[-1]["step"] if records else -1


def state(run_dir: Path) -> str:
    return (runs.read_status(run_dir) or {}).get("state", "")


def demo_config(model: str, **overrides) -> cfg.TrainConfig:
    raw = dict(model=model, dataset=["identity"], dataset_dir=DATA, epochs=1, batch_size=8,
               learning_rate=3e-3, lora_rank=8, lora_alpha=16, cutoff_len=128)
    raw.update(overrides)
    return cfg.from_mapping(raw)


# --- without the trainer ----------------------------------------------------------

def test_train_command_is_the_cli_next_to_this_python(tmp_path):
    argv = launch.train_command(tmp_path / "config.yaml")
    assert argv[-2:] == ["train", str(tmp_path / "config.yaml")]
    script = Path(sys.executable).with_name("tunebench")
    assert argv[0] == (str(script) if script.exists() else sys.executable)


def test_log_tail_reads_only_the_end_and_keeps_the_last_progress_redraw(tmp_path):
    log = tmp_path / "train.log"
    with open(log, "w") as fh:
        for i in range(50_000):
            fh.write(f"line {i}\n")
        fh.write("bar 10%\rbar 50%\rbar 90%\n")
    tail = launch.log_tail(log, lines=3, max_bytes=4096)
    assert tail.splitlines() == ["line 49998", "line 49999", "bar 90%"]
    assert launch.log_tail(tmp_path / "missing.log") == ""


def _stubborn_process(tmp_path: Path) -> subprocess.Popen:
    """A process that ignores SIGTERM, like a trainer stuck in a C call."""
    code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "open(r'%s', 'w').close(); time.sleep(120)" % (tmp_path / "ready"))
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    wait_for(lambda: (tmp_path / "ready").exists(), 20, "the process to start")
    return proc


def test_abort_escalates_to_sigkill_and_marks_aborted(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = _stubborn_process(tmp_path)
    runs.write_status(run_dir, "running", pid=proc.pid)
    started = time.monotonic()
    final = launch.abort_run(run_dir, grace_s=1.0)
    assert time.monotonic() - started < 10
    assert proc.wait(timeout=5) == -signal.SIGKILL
    assert final["state"] == "aborted" and runs.read_status(run_dir)["state"] == "aborted"


def test_abort_of_a_process_started_by_hand_spares_its_process_group(tmp_path):
    """A trainer that is not its group's leader: only it (and its children) are signalled."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # our group
    runs.write_status(run_dir, "running", pid=proc.pid)
    final = launch.abort_run(run_dir, grace_s=5.0)
    assert proc.wait(timeout=5) == -signal.SIGTERM
    assert final["state"] == "aborted"  # and this test process, in the same group, lives on


def test_running_runs_notices_a_dead_trainer(tmp_path):
    run_dir = tmp_path / "ghost"
    run_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    runs.write_status(run_dir, "running", pid=proc.pid)
    assert launch.running_runs(tmp_path) == []
    assert runs.read_status(run_dir)["state"] == "failed"


def test_a_taken_run_name_is_refused(tmp_path):
    (tmp_path / "mine").mkdir()
    with pytest.raises(BadInput, match="taken"):
        launch.start_run(demo_config("demo", run_name="mine"), tmp_path)


def test_start_refused_while_a_run_is_going(tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            start_new_session=True)
    try:
        runs.write_status(busy, "running", pid=proc.pid)
        with pytest.raises(BadInput, match="'busy' is still running"):
            launch.start_run(demo_config("demo"), tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == \
            ["busy"]  # nothing was created for the refused run
    finally:
        proc.kill()
        proc.wait()


# --- with the real trainer ----------------------------------------------------------

@pytest.mark.train
def test_a_launched_run_writes_the_run_directory_and_completes(tmp_path, demo_model_path):
    config = demo_config(str(demo_model_path), run_name="first")
    run_dir = launch.start_run(config, tmp_path)
    assert run_dir == tmp_path / "first"
    status = runs.read_status(run_dir)
    assert status["state"] in ("running", "completed") and status["pid"] > 0
    # Detached: its own session, so a Ctrl-C or exit of the launcher never reaches it.
    if status["state"] == "running":
        assert os.getsid(status["pid"]) == status["pid"]
    wait_for(lambda: state(run_dir) != "running", 180, "the run to end")
    status = runs.read_status(run_dir)
    assert status["state"] == "completed", launch.log_tail(run_dir / runs.LOG)
    assert status["exit_code"] == 0 and status["error"] is None
    saved = cfg.load(run_dir / runs.CONFIG)
    assert Path(saved.output_dir).resolve() == run_dir.resolve()
    assert cfg.to_dict(saved) | {"output_dir": ""} == cfg.to_dict(config) | {"output_dir": "",
                                                                            "run_name": "first"}
    assert "train" in (run_dir / runs.COMMAND).read_text()
    records = runs.read_metrics(run_dir)
    assert any("loss" in r for r in records)
    assert records[-1]["step"] == records[-1]["total_steps"]
    assert (run_dir / "final").is_dir() and "step" in (run_dir / runs.LOG).read_text()


@pytest.mark.train
def test_abort_keeps_the_checkpoint_and_resume_finishes_the_run(tmp_path, demo_model_path):
    config = demo_config(str(demo_model_path), run_name="long", epochs=6, save_steps=2,
                         batch_size=4)
    run_dir = launch.start_run(config, tmp_path)
    wait_for(lambda: last_step(run_dir) >= 3, 180, "step 3")
    with pytest.raises(BadInput, match="still running"):
        launch.start_run(demo_config(str(demo_model_path)), tmp_path)
    pid = runs.read_status(run_dir)["pid"]
    started = time.monotonic()
    final = launch.abort_run(run_dir)
    assert time.monotonic() - started < 15
    assert final["state"] == "aborted"
    assert not runs.pid_alive(pid)
    checkpoint = runs.last_checkpoint(run_dir)
    assert checkpoint is not None, launch.log_tail(run_dir / runs.LOG)
    stopped_at = int(checkpoint.name.split("-")[1])

    launch.resume_run(run_dir, tmp_path)
    wait_for(lambda: state(run_dir) != "running", 240, "the resumed run to end")
    assert state(run_dir) == "completed", launch.log_tail(run_dir / runs.LOG)
    records = runs.read_metrics(run_dir)
    assert records[-1]["step"] == records[-1]["total_steps"] > stopped_at
    assert cfg.load(run_dir / runs.CONFIG).resume is True


@pytest.mark.train
def test_a_run_that_fails_shows_its_error_in_status(tmp_path, demo_model_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi", "output": "hello"}\n{"instruction": 3}\n')
    run_dir = launch.start_run(demo_config(str(demo_model_path), dataset=[str(bad)]), tmp_path)
    wait_for(lambda: state(run_dir) != "running", 120, "the run to fail")
    status = runs.read_status(run_dir)
    assert status["state"] == "failed" and status["exit_code"] == 2
    assert "bad.jsonl" in status["error"] and "record 2" in status["error"]


@pytest.mark.train
def test_a_failed_run_keeps_its_error_in_every_language(tmp_path, demo_model_path):
    """status.json's `error` stays English; `error_msg` renders it in the reader's language."""
    config = demo_config(str(demo_model_path), max_samples=1, val_size=0.5)
    run_dir = launch.start_run(config, tmp_path)
    wait_for(lambda: state(run_dir) != "running", 120, "the run to fail")
    status = runs.read_status(run_dir)
    assert status["state"] == "failed" and status["error_msg"]["code"] == "job.data.val_size_all"
    assert runs.error_text(status, "en") == status["error"]
    assert status["error"] == "field 'val_size': val_size 0.5 leaves no records to train on"
    chinese = runs.error_text(status, "zh")
    assert chinese != status["error"] and "val_size 0.5" in chinese
    assert any("\u4e00" <= ch <= "\u9fff" for ch in chinese)


def test_the_launcher_replaces_a_guessed_death_with_the_real_cause(tmp_path):
    """The race that once failed CI: a poll sees the zombie before the launcher reaps it."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    runs.write_status(tmp_path, "running", pid=proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    wait_for(lambda: runs.read_status(tmp_path)["state"] == "failed", 10, "the guess")
    assert runs.read_status(tmp_path)["guessed"]
    launch._reap(proc, tmp_path)
    status = runs.read_status(tmp_path)
    assert "SIGKILL" in status["error"] and not status.get("guessed")
    assert status["exit_code"] == -signal.SIGKILL


@pytest.mark.train
def test_a_trainer_killed_hard_is_recorded_as_failed_with_the_cause(tmp_path, demo_model_path):
    run_dir = launch.start_run(demo_config(str(demo_model_path), epochs=20), tmp_path)
    wait_for(lambda: last_step(run_dir) >= 1, 180, "the first step")
    os.kill(runs.read_status(run_dir)["pid"], signal.SIGKILL)
    wait_for(lambda: state(run_dir) == "failed", 20, "the failure to be recorded")
    # A page poll may notice the dead pid before the launcher reaps it; the launcher
    # then replaces that guess with the real cause.
    wait_for(lambda: not runs.read_status(run_dir).get("guessed"), 20, "the real cause")
    error = runs.read_status(run_dir)["error"]
    assert "SIGKILL" in error and "out-of-memory" in error
    assert json.loads((run_dir / runs.STATUS).read_text())["exit_code"] == -signal.SIGKILL
