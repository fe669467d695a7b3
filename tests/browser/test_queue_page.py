"""The job queue seen from the Train tab: a Start while a run trains queues the run, the
page shows it queued with its position, a restarted page server shows the queue as it is,
and the queued run starts by itself when the first ends."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from page_helpers import (choose, open_tab, shot, start_run, status_text, table_rows, text_of,
                          wait_until)
from servers import abort_all_runs, new_project, start_server, stop_server

from core import job_queue, launch, runs

pytestmark = pytest.mark.train
SHOT_DIR = Path("/tmp/helpers/queue")


@pytest.fixture
def own_cache(tmp_path, demo_model_path) -> Path:
    """The demo model seen through a private cache folder, so this test's jobs registry
    (and so its machine's "busy") is its own, whatever else this machine trains."""
    cache = tmp_path / "cache"
    cache.mkdir()
    link = cache / demo_model_path.name
    os.symlink(demo_model_path, link)
    return link


def open_page(browser, url: str):
    page = browser.new_context(viewport={"width": 1400, "height": 1100}).new_page()
    page.set_default_timeout(30_000)
    page.goto(url)
    page.wait_for_selector("#train-start")
    return page


def row_state(page, name: str) -> str:
    return next((row[1] for row in table_rows(page) if row and row[0] == name), "")


def test_a_start_while_busy_queues_and_the_queue_survives_a_server_restart(
        browser, tmp_path_factory, own_cache):
    project = new_project(tmp_path_factory)
    saves = project / "saves"
    first = start_server(project, own_cache)
    try:
        page = open_page(browser, first.url)
        one = start_run(page, first, **{"train-epochs": 300})  # trains until aborted
        assert runs.read_status(one)["state"] == "running"
        two = start_run(page, first, **{"train-epochs": 1})  # Start again while one trains
        wait_until(lambda: "queued, position 1" in status_text(page), 10,
                   "the page to say the run is queued")
        assert runs.read_status(two)["state"] == "queued"
        wait_until(lambda: row_state(page, two.name) == "queued #1", 20,
                   "the runs list to show the queued run")
        # A third goes behind it; moved up it goes first; cancelled it leaves the queue.
        three = start_run(page, first)
        wait_until(lambda: "queued, position 2" in status_text(page), 10, "position 2")
        page.click("#train-queue-up")
        wait_until(lambda: "queued, position 1" in status_text(page), 10, "the move up")
        assert [e.run_dir.name for e in job_queue.entries(saves)] == [three.name, two.name]
        wait_until(lambda: row_state(page, two.name) == "queued #2", 20, "the list to follow")
        page.click("#train-queue-cancel")
        wait_until(lambda: "aborted" in status_text(page), 10, "the cancel")
        assert job_queue.CANCELLED in status_text(page)
        assert runs.read_status(three)["state"] == "aborted"
        assert [e.run_dir.name for e in job_queue.entries(saves)] == [two.name]
        choose(page, "train-run", two.name)
        wait_until(lambda: "queued, position 1" in status_text(page), 10, "the queued run")
        assert runs.read_status(one)["state"] == "running"  # all of this while one trains
        shot_path = SHOT_DIR / "queue-page-queued.png"
        SHOT_DIR.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot_path), full_page=True)
        page.context.close()
    finally:
        stop_server(first.proc)

    try:
        # No page server: the queue is files and a runner, and the first run trains on.
        assert runs.read_status(two)["state"] == "queued"
        second = start_server(project, own_cache)
        try:
            page = open_page(browser, second.url)
            wait_until(lambda: row_state(page, two.name) == "queued #1", 20,
                       "the restarted server to list the queued run")
            assert row_state(page, one.name) == "running"
            choose(page, "train-run", two.name)
            wait_until(lambda: "queued, position 1" in status_text(page), 20,
                       "the queued run to show")
            # The first run ends (aborted from outside the page); the queued one starts by
            # itself, and the page showing it follows.
            launch.abort_run(one, grace_s=3)
            try:
                wait_until(lambda: "running" in status_text(page) or
                           "completed" in status_text(page), 60, "the queued run to start")
                wait_until(lambda: "completed" in status_text(page), 180,
                           "the queued run to run and complete", interval=1)
            except AssertionError:
                page.screenshot(path=str(SHOT_DIR / "queue-page-failed.png"), full_page=True)
                raise
            assert runs.read_status(one)["state"] == "aborted"
            assert runs.read_status(two)["state"] == "completed"
            assert runs.read_status(one)["ended_at"] <= runs.read_status(two)["started_at"]
            assert not job_queue.entries(saves)
            shot(page, "queue-page-after")
            page.screenshot(path=str(SHOT_DIR / "queue-page-after.png"), full_page=True)
        finally:
            stop_server(second.proc)
    finally:
        abort_all_runs(project)


def test_eval_and_export_started_while_a_run_trains_are_queued(browser, tmp_path_factory,
                                                               own_cache):
    """The Evaluate and Export tabs queue their jobs behind a training run: each says so
    with its position, Stop takes the export out of the queue, and the eval job runs by
    itself once the run ends."""
    project = new_project(tmp_path_factory)
    saves = project / "saves"
    server = start_server(project, own_cache)
    try:
        page = open_page(browser, server.url)
        one = start_run(page, server, **{"train-epochs": 300})  # trains until aborted
        open_tab(page, "Evaluate")
        choose(page, "eval-task", "loss")
        page.click("#eval-start")
        wait_until(lambda: "queued, position 1" in text_of(page, "eval-status"), 60,
                   "the eval job to be queued")
        assert "Queued" in text_of(page, "eval-results")
        open_tab(page, "Export")
        page.click("#export-start")
        wait_until(lambda: page.locator("#export-queued").count(), 30,
                   "the export to be queued")
        assert "position 2" in text_of(page, "export-status")
        waiting = job_queue.entries(saves)
        assert [e.command for e in waiting] == ["eval", "export"]
        shot(page, "queue-export-queued")
        page.click("#export-abort")
        wait_until(lambda: job_queue.CANCELLED in text_of(page, "export-status"), 20,
                   "the export to leave the queue")
        assert [e.command for e in job_queue.entries(saves)] == ["eval"]
        assert runs.read_status(one)["state"] == "running"
        launch.abort_run(one, grace_s=3)
        open_tab(page, "Evaluate")
        wait_until(lambda: "completed" in text_of(page, "eval-status"), 180,
                   "the queued eval job to run", interval=1)
        assert runs.read_status(waiting[0].run_dir)["state"] == "completed"
        assert runs.read_status(one)["ended_at"] <= \
            runs.read_status(waiting[0].run_dir)["started_at"]
        shot(page, "queue-eval-ran")
    finally:
        stop_server(server.proc)
        abort_all_runs(project)
