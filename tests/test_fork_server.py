"""The fork server that runs the page's dataset reads: each request in a fresh child of a
warm parent, isolated from it and from each other, with a deadline that kills the child."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from webui import fork_server

TESTS = Path(__file__).parent


@pytest.fixture()
def forks(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(TESTS.parent)]))
    server = fork_server.ForkServer("fork_probe")
    yield server
    server.stop()


def test_each_request_runs_in_its_own_child_of_one_parent(forks, tmp_path, monkeypatch):
    first = forks.ask({"action": "echo"}, 30)
    monkeypatch.chdir(tmp_path)
    second = forks.ask({"action": "echo"}, 30)
    assert first["parent"] == second["parent"] == forks.proc.pid
    assert first["pid"] != second["pid"] != forks.proc.pid
    assert second["cwd"] == str(tmp_path)  # a child works where its caller does


def test_a_dying_or_raising_child_is_named_and_the_parent_goes_on(forks):
    with pytest.raises(fork_server.WorkerFailed, match="died before it answered"):
        forks.ask({"action": "exit"}, 30)
    with pytest.raises(fork_server.WorkerFailed, match="a bug in the handler"):
        forks.ask({"action": "raise"}, 30)
    parent = forks.proc.pid
    assert forks.ask({"action": "echo"}, 30)["parent"] == parent


def test_a_child_past_its_deadline_is_killed(forks):
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        forks.ask({"action": "sleep", "seconds": 60}, 1)
    assert time.monotonic() - started < 10
    # the killed child's pid is gone (reaped by the parent's kernel setting, not a zombie)
    time.sleep(0.2)
    children = [p for p in os.listdir("/proc") if p.isdigit() and _parent_of(p) == forks.proc.pid]
    assert children == []


def test_a_childs_memory_leaves_with_it(forks):
    forks.ask({"action": "echo"}, 30)
    before = _rss_mib(forks.proc.pid)
    forks.ask({"action": "grow", "mib": 400}, 60)
    assert _rss_mib(forks.proc.pid) < before + 20


def test_a_changed_environment_starts_a_new_parent(forks, monkeypatch):
    first = forks.ask({"action": "echo"}, 30)
    monkeypatch.setenv("FORK_PROBE", "changed")
    second = forks.ask({"action": "echo"}, 30)
    assert second["env"] == "changed" and second["parent"] != first["parent"]


def _parent_of(pid: str) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")
