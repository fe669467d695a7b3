"""Fixtures for the browser tests: a real `tunebench webui` in a scratch project, and Chromium.

The server runs as a subprocess in a copy of the project (its own data/ and saves/),
exactly as a user starts it. Playwright drives Debian's Chromium (Playwright's own
browser download does not work offline).
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

import pytest

from core import demo_model, launch

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"


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


def start_server(project: Path, demo_model_path: Path) -> Server:
    """`tunebench webui` in `project`, as a user starts it; returns once it answers HTTP."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
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
    for run in launch.running_runs(project / "saves"):  # trainers outlive the server
        launch.abort_run(run.path, grace_s=3)


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_model_path):
    project = new_project(tmp_path_factory)
    running = start_server(project, demo_model_path)
    try:
        yield running
    finally:
        abort_all_runs(project)
        stop_server(running.proc)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(server.url)
    page.wait_for_selector("#train-start")
    yield page
    context.close()
