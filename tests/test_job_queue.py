"""core/job_queue.py: runs that wait for the devices, on disk, started one after another.

The slot arithmetic and the queue's files are tested directly; the rest trains the demo
model for real (a few steps) through `tunebench train --queue` and the runner.

Every test gets its own TUNEBENCH_CACHE (so its own machine-wide jobs registry): runs
that other sessions train on this machine do not make these tests' machine busy.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from core import job_queue, jobs, launch, runs
from core.errors import BadInput

from test_launch import wait_for

REPO = Path(__file__).resolve().parent.parent
TINY = ["dataset=identity", f"dataset_dir={REPO / 'data'}", "max_samples=16", "batch_size=8",
        "epochs=1", "cutoff_len=64", "lora_rank=4", "save_steps=0"]


@pytest.fixture
def machine(tmp_path, monkeypatch, demo_model_path):
    """A private jobs registry and a project folder with saves/; yields the project."""
    monkeypatch.setenv("TUNEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(job_queue.FAKE_GPUS_ENV, raising=False)
    project = tmp_path / "project"
    (project / "saves").mkdir(parents=True)
    monkeypatch.chdir(project)
    yield project
    _stop_everything(project)


def _stop_everything(project: Path) -> None:
    """Kill this test's runner and trainers (they live in their own sessions)."""
    for pid in _runner_pids(project):
        _kill(pid)
    for job in jobs.active():
        _kill(job.pid)


def _kill(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _runner_pids(project: Path) -> list[int]:
    import psutil
    folder = str(job_queue.queue_dir(project / "saves").parent)
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "core.job_queue" in cmd and folder in cmd and proc.status() != psutil.STATUS_ZOMBIE:
            found.append(proc.pid)
    return found


def _model(demo_model_path: Path) -> str:
    return f"model={demo_model_path}"


def _queue_argv(demo_model_path: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "core", "train", _model(demo_model_path), *TINY,
            f"run_name={name}", "--queue"]


def _queue_cli(project: Path, demo_model_path: Path, name: str) -> subprocess.Popen:
    """`tunebench train ... --queue` in the project, its output in <name>.out there."""
    with open(project / f"{name}.out", "w") as out:
        return subprocess.Popen(_queue_argv(demo_model_path, name), cwd=project,
                                env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _ended(run_dir: Path) -> bool:
    return (runs.read_status(run_dir) or {}).get("state") in ("completed", "failed", "aborted")


def _interval(run_dir: Path) -> tuple[float, float]:
    import datetime as dt
    status = runs.read_status(run_dir)
    return (dt.datetime.fromisoformat(status["started_at"]).timestamp(),
            dt.datetime.fromisoformat(status["ended_at"]).timestamp())


def _starts(run_dir: Path) -> int:
    """How many times a trainer started in this folder (each start logs one settings line)."""
    return sum(line.startswith("settings") for line in
               (run_dir / runs.LOG).read_text().splitlines())


def _queue_folder(saves: Path, name: str) -> Path:
    run_dir = saves / name
    run_dir.mkdir()
    (run_dir / runs.CONFIG).write_text("model: demo\n")
    with jobs.lock():
        job_queue.enqueue(run_dir, saves)
    return run_dir


# --- the slot arithmetic --------------------------------------------------------------

def test_a_cpu_machine_is_one_slot():
    assert job_queue.pick_devices(0, [], 1) == ()
    assert job_queue.pick_devices(0, [frozenset()], 1) is None
    assert job_queue.pick_devices(0, [None], 4) is None


def test_gpu_jobs_run_side_by_side_when_enough_devices_are_free():
    assert job_queue.pick_devices(2, [], 1) == (0,)
    assert job_queue.pick_devices(2, [frozenset({0})], 1) == (1,)
    assert job_queue.pick_devices(2, [frozenset({0})], 2) is None
    assert job_queue.pick_devices(4, [frozenset({1}), frozenset({2})], 2) == (0, 3)
    assert job_queue.pick_devices(4, [frozenset({0, 1, 2, 3})], 1) is None
    # A job the queue did not start (a terminal's run) holds every device.
    assert job_queue.pick_devices(8, [None], 1) is None
    # More than the machine has: capped, so it runs alone rather than never.
    assert job_queue.pick_devices(2, [], 4) == (0, 1)


def test_the_fake_gpu_hook_and_cuda_visible_devices_name_the_ids(monkeypatch):
    monkeypatch.setenv(job_queue.FAKE_GPUS_ENV, "3")
    assert job_queue.visible_devices() == ["0", "1", "2"]
    monkeypatch.delenv(job_queue.FAKE_GPUS_ENV)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert job_queue.visible_devices() == ["4", "6"]


def test_two_fake_gpus_start_two_one_gpu_jobs_with_their_own_device(machine, monkeypatch):
    monkeypatch.setenv(job_queue.FAKE_GPUS_ENV, "2")
    saves = machine / "saves"
    # Real processes stand in for the jobs: `python -c` that waits, whatever its argv says.
    monkeypatch.setattr(launch, "job_command", lambda command, path: [
        sys.executable, "-c", "import os, time; print(os.environ['CUDA_VISIBLE_DEVICES'], "
        "flush=True); time.sleep(60)", str(path)])
    a, b, c = (_queue_folder(saves, n) for n in ("a", "b", "c"))
    with jobs.lock():
        started = job_queue.start_ready(saves)
    assert started == [a.resolve(), b.resolve()]  # c waits: both devices are taken
    assert [e.run_dir.name for e in job_queue.entries(saves)] == ["c"]
    logs = [wait_for(lambda d=d: (d / runs.LOG).read_text().strip(), 10, "the job's output")
            for d in (a, b)]
    assert logs == ["0", "1"]
    with jobs.lock():
        assert job_queue.start_ready(saves) == []
    for d in (a, b):
        _kill(runs.read_status(d)["pid"])


# --- the queue's files: order, cancel, move ------------------------------------------

def test_queued_jobs_keep_their_order_and_can_be_moved_up_and_cancelled(machine):
    saves = machine / "saves"
    a, b, c = (_queue_folder(saves, n) for n in ("a", "b", "c"))
    assert [job_queue.position(d) for d in (a, b, c)] == [1, 2, 3]
    status = runs.read_status(c)
    assert status["state"] == "queued" and status["pid"] is None and status["ended_at"] is None
    assert job_queue.state_label(c, "queued") == "queued #3"

    assert job_queue.move_up(saves, c) == 2
    assert [e.run_dir.name for e in job_queue.entries(saves)] == ["a", "c", "b"]
    assert job_queue.move_up(saves, c) == 1
    assert job_queue.move_up(saves, c) == 1  # the head stays the head
    assert [e.run_dir.name for e in job_queue.entries(saves)] == ["c", "a", "b"]

    ended = job_queue.cancel(saves, a)
    assert ended["state"] == "aborted" and ended["error"] == job_queue.CANCELLED
    assert runs.read_status(a)["state"] == "aborted"
    assert (a / runs.CONFIG).exists()  # the folder stays, to start again
    assert [e.run_dir.name for e in job_queue.entries(saves)] == ["c", "b"]
    assert job_queue.position(a) is None and job_queue.position(b) == 2
    with pytest.raises(BadInput, match="not waiting in the queue"):
        job_queue.cancel(saves, a)
    # The queue folder is hidden from the runs list; the queued runs are listed.
    assert [p.name for p in runs.run_dirs(saves)] == ["a", "b", "c"]


def test_a_claim_left_by_a_killed_runner_is_started_once(machine, monkeypatch):
    """Killed after the claim but before the spawn: the job waits again and starts once.
    Killed after the spawn: the job is not started a second time."""
    saves = machine / "saves"
    spawned = []
    monkeypatch.setattr(launch, "job_command", lambda command, path: spawned.append(path) or [
        sys.executable, "-c", "import time; time.sleep(60)", str(path)])
    never, already = _queue_folder(saves, "never"), _queue_folder(saves, "already")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for entry in job_queue.entries(saves):  # both claimed by a runner that is gone
        entry.claim = {"pid": dead.pid, "started_at": runs.now_iso(), "devices": []}
        runs.write_atomic(entry.path, entry.to_json())
    # "already" was spawned before its runner died: a live process runs its config.
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             str(already / runs.CONFIG)], start_new_session=True)
    try:
        with jobs.lock():
            job_queue._settle(saves)
        assert [e.run_dir.name for e in job_queue.entries(saves)] == ["never"]
        assert job_queue.entries(saves)[0].claim is None
        with jobs.lock():
            assert job_queue.start_ready(saves) == [never.resolve()]
        assert spawned == [never / runs.CONFIG]
        _kill(runs.read_status(never)["pid"])
    finally:
        proc.kill()
        proc.wait()


def test_eval_and_export_jobs_queue_behind_a_running_job(machine, monkeypatch,
                                                        demo_model_path):
    """Started while another job runs: refused without `queue`, queued with it, and the
    runner starts each with its own command, log and kind."""
    from core import config as cfg
    from core.export_job import ExportJob
    saves = machine / "saves"
    busy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            start_new_session=True)
    jobs.register(saves / "elsewhere", busy.pid)
    monkeypatch.setattr(job_queue, "ensure_runner", lambda saves_dir: None)  # started below
    evaluation = cfg.EvalConfig(model=str(demo_model_path))
    export = ExportJob(model=str(demo_model_path), out=str(saves / "exports" / "demo-out"))
    try:
        with pytest.raises(BadInput, match="still running"):
            launch.start_eval(evaluation, saves)
        queued = [launch.start_eval(evaluation, saves, queue=True),
                  launch.start_export(export, saves, queue=True)]
        assert [runs.read_status(f)["state"] for f in queued] == ["queued", "queued"]
        assert [runs.read_status(f).get("kind") for f in queued] == ["eval", "export"]
        assert [e.command for e in job_queue.entries(saves)] == ["eval", "export"]
        busy.kill()
        busy.wait()
        spawned = []
        monkeypatch.setattr(launch, "job_command", lambda command, path: spawned.append(
            command) or [sys.executable, "-c", "pass"])
        with jobs.lock():
            assert job_queue.start_ready(saves) == [queued[0].resolve()]  # one slot
        assert spawned == ["eval"] and (queued[0] / runs.EVAL_LOG).exists()
        assert runs.read_status(queued[0])["kind"] == "eval"
    finally:
        busy.kill()


def test_eval_and_export_from_the_command_line_queue_with_queue(machine, demo_model_path):
    """`tunebench eval|export ... --queue` on a busy machine: job folders under saves/,
    queued in order, nothing run yet."""
    saves = machine / "saves"
    busy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                            start_new_session=True)
    jobs.register(saves / "elsewhere", busy.pid)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    try:
        said = [subprocess.run([sys.executable, "-m", "core", *argv, "--queue"], cwd=machine,
                               env=env, capture_output=True, text=True, timeout=120)
                for argv in (["eval", f"model={demo_model_path}", "eval_task=loss",
                              f"dataset_dir={REPO / 'data'}", "dataset=identity"],
                             ["export", "--model", str(demo_model_path), "--out",
                              str(saves / "exports" / "demo")])]
        assert [r.returncode for r in said] == [0, 0], [r.stdout + r.stderr for r in said]
        assert "queued at position 1" in said[0].stdout and "eval.log" in said[0].stdout
        assert "queued at position 2" in said[1].stdout and "export.log" in said[1].stdout
        waiting = job_queue.entries(saves)
        assert [e.command for e in waiting] == ["eval", "export"]
        assert all(runs.read_status(e.run_dir)["state"] == "queued" for e in waiting)
        bad = subprocess.run([sys.executable, "-m", "core", "eval", f"model={demo_model_path}",
                              f"dataset_dir={REPO / 'data'}", "dataset=no_such_set", "--queue"],
                             cwd=machine, env=env, capture_output=True, text=True, timeout=120)
        assert bad.returncode != 0 and "no_such_set" in bad.stdout + bad.stderr
        assert len(job_queue.entries(saves)) == 2  # refused at once, nothing queued
    finally:
        busy.kill()


# --- real training ----------------------------------------------------------------

@pytest.mark.train
def test_three_queued_cli_runs_finish_in_order_and_a_killed_runner_loses_nothing(
        machine, demo_model_path):
    """Three `tunebench train --queue` at once: one trains now, two queue. The runner is
    killed (SIGKILL) while they wait; a new one (what the next queue call or the page's
    tick starts) finishes them, one after another, in queue order, each started once."""
    saves = machine / "saves"
    names = ("q0", "q1", "q2")
    procs = [_queue_cli(machine, demo_model_path, name) for name in names]
    said = lambda name: (machine / f"{name}.out").read_text()  # noqa: E731
    wait_for(lambda: sum("queued at position" in said(n) for n in names) == 2, 60,
             "two runs to be queued")
    queued = {n: int(said(n).split("queued at position ")[1].split(":")[0])
              for n in names if "queued at position" in said(n)}
    assert sorted(queued.values()) == [1, 2], queued
    foreground = [n for n in names if n not in queued]
    order = foreground + sorted(queued, key=queued.get)
    assert [e.run_dir.name for e in job_queue.entries(saves)] == order[1:]

    # Each queueing CLI started a runner (before it printed): the later one finds the lock
    # held and exits. Once one is left, it is the one to kill.
    wait_for(lambda: len(_runner_pids(machine)) == 1, 60, "one runner to be left")
    runner = wait_for(lambda: job_queue.runner_pid(saves), 10, "a runner")
    assert [j.run_dir.name for j in jobs.active()] == order[:1]  # the others still wait
    os.kill(runner, signal.SIGKILL)
    wait_for(lambda: not job_queue.runner_alive(saves), 10, "the runner to die")
    assert [e.run_dir.name for e in job_queue.entries(saves)] == order[1:]  # nothing lost
    assert all(runs.read_status(saves / n)["state"] == "queued" for n in order[1:])
    assert job_queue.ensure_runner(saves)

    for name in order:
        wait_for(lambda n=name: _ended(saves / n), 120, f"run {name} to end")
    for proc in procs:
        proc.wait(timeout=30)
    for name in order:
        status = runs.read_status(saves / name)
        assert status["state"] == "completed", launch.log_tail(saves / name / runs.LOG)
        assert _starts(saves / name) == 1  # no run folder shows two starts
    spans = [_interval(saves / name) for name in order]
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end <= start, spans  # no overlap, in queue order
    wait_for(lambda: not _runner_pids(machine), 10, "the runner to exit on an empty queue")
    assert not job_queue.entries(saves)
