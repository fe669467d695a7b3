"""A real `tunebench webui` for the browser tests, in a scratch copy of the project.

The server runs as a subprocess in its own data/ and saves/, exactly as a user starts
it. The fixtures in conftest.py use these, and so does a test that restarts the server.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from core import demo_model, job_queue, launch

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Server:
    url: str
    project: Path
    proc: subprocess.Popen
    startup_s: float
    model: str          # what to type in train-model ("demo" when the cache holds it)

    @property
    def saves(self) -> Path:
        return self.project / "saves"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _command(port: int) -> list[str]:
    script = Path(sys.executable).with_name("tunebench")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "webui.cli"]
    return base + ["webui", "--port", str(port)]


def _wait_http_200(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the web server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"no HTTP 200 from {url} within {timeout} s")


def start_server(project: Path, demo_model_path: Path, **extra_env: str) -> Server:
    """`tunebench webui` in `project`, as a user starts it; returns once it answers HTTP."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", **extra_env)
    model = str(demo_model_path)
    env["TUNEBENCH_ALLOWED_ROOTS"] = str(Path(demo_model_path).parent)  # the page may use it
    if Path(demo_model_path).name == demo_model.default_path().name:
        env["TUNEBENCH_CACHE"] = str(Path(demo_model_path).parent)  # "demo" resolves to it
        model = "demo"
    port = _free_port()
    started = time.monotonic()
    with open(project / "webui.log", "ab") as log:  # a file: an unread pipe could fill up
        proc = subprocess.Popen(_command(port), cwd=project, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_http_200(url, proc, timeout=120)
    except BaseException:
        stop_server(proc)
        raise
    startup = time.monotonic() - started
    print(f"\nweb server: first HTTP 200 after {startup:.2f} s")
    return Server(url, project, proc, startup, model)


def stop_server(proc: subprocess.Popen) -> None:
    """Stop the web server only; training runs live in their own sessions and go on."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def new_project(tmp_path_factory) -> Path:
    project = tmp_path_factory.mktemp("project")
    shutil.copytree(REPO / "data", project / "data")
    (project / "saves").mkdir()
    return project


def abort_all_runs(project: Path) -> None:
    """Stop the test's own jobs (they outlive the server): first empty its queue, so its
    runner starts nothing more and exits, then stop its trainers. A job that something else
    on the machine runs with the same cache folder is left alone."""
    own = (project / "saves").resolve()
    for entry in job_queue.entries(own):
        job_queue.cancel(own, entry.run_dir)
    for run in launch.running_runs(project / "saves"):
        if run.path.resolve().is_relative_to(own):
            launch.abort_run(run.path, grace_s=3)
