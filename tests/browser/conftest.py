"""Fixtures for the browser tests: a real `tunebench webui` in a scratch project, and Chromium.

The server runs as a subprocess in a copy of the project (its own data/ and saves/),
exactly as a user starts it (see servers.py). Playwright drives Debian's Chromium
(Playwright's own browser download does not work offline).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from servers import abort_all_runs, new_project, start_server, stop_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared run
from test_chat import identity_run  # noqa: E402

CHROMIUM = "/usr/bin/chromium"


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
def run_in_saves(server, tmp_path_factory, demo_model_path):
    """The session's identity fine-tune, copied into the server's saves/ as 'identity'."""
    run = identity_run(tmp_path_factory.getbasetemp(), demo_model_path)
    target = server.saves / "identity"
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("probes.json"))
    return target


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
