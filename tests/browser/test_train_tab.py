"""The Train tab in a real browser: start, watch live, reload, abort, finish.

Drives `tunebench webui` (a subprocess) with Chromium and trains the demo model
for real. The runs are short, so the whole module stays within a few minutes on
a 2-core CPU. Screenshots go to $TUNEBENCH_SHOTS (default /tmp/shots).
"""

from __future__ import annotations

import json
import re
import time

import psutil
import pytest
from page_helpers import (SMOOTH_COLOR, choose, fill, last_step, loss_lines, points, run_dirs,
                          shot, start_run, status_text, table_rows, text_of, wait_until)

from core import config as cfg
from core import runs

pytestmark = [pytest.mark.browser, pytest.mark.train]


def test_bad_settings_and_bad_data_are_explained_and_nothing_starts(page, server):
    fill(page, "train-lora-rank", 0)
    fill(page, "train-epochs", -1)
    wait_until(lambda: "lora_rank" in page.locator("#train-command").inner_text(), 10,
               "the command box to list the problem")
    page.click("#train-start")
    wait_until(lambda: "not started" in status_text(page), 10, "the refusal")
    text = status_text(page)
    assert "lora_rank: must be at least 1" in text and "epochs: must be at least" in text
    shot(page, "train-bad-input")

    (server.project / "data" / "broken.jsonl").write_text(
        '{"instruction": "hi", "output": "hello"}\n{"instruction": "no output"}\n')
    fill(page, "train-lora-rank", 32)
    fill(page, "train-epochs", 3)
    choose(page, "train-dataset", "data/broken.jsonl")
    wait_until(lambda: "broken.jsonl" in page.locator("#train-command").inner_text(), 10,
               "the dataset to reach the form")
    page.click("#train-start")
    wait_until(lambda: "record 2" in status_text(page), 20, "the data problem to be shown")
    assert "broken.jsonl" in status_text(page)
    assert run_dirs(server.saves) == []


def test_save_reset_and_load_a_config(page, server):
    fill(page, "train-epochs", 7)
    fill(page, "train-config-name", "seven-epochs")
    page.click("#train-config-save")
    wait_until(lambda: "Saved" in page.locator("#train-config-msg").inner_text(), 10, "saving")
    saved = server.saves / "configs" / "seven-epochs.yaml"
    assert "epochs: 7" in saved.read_text()
    page.click("#train-config-reset")
    epochs = page.locator("#train-epochs input")
    quick_epochs = f"{cfg.first_job().epochs:g}"  # reset returns to the first job
    wait_until(lambda: epochs.input_value() == quick_epochs, 10, "the reset")
    choose(page, "train-config-file", "seven-epochs")
    page.click("#train-config-load")
    wait_until(lambda: epochs.input_value() == "7", 10, "the loaded value")
    wait_until(lambda: "epochs: 7" in page.locator("#train-command").inner_text(), 10,
               "the command box to follow the loaded config")


def test_watch_live_reload_and_abort(page, server):
    page.click("#train-advanced")  # save_steps lives in the folded advanced settings
    run_dir = start_run(page, server, **{"train-epochs": 30, "train-save-steps": 3,
                                         "train-batch-size": 4})
    wait_until(lambda: "epochs: 30" in page.locator("#train-command").inner_text(), 10,
               "the command box to follow the form")
    wait_until(lambda: points(page) >= 3, 150, "the chart to show 3 points")
    assert points(page, SMOOTH_COLOR) == points(page)
    assert re.search(r"step \d+/\d+", page.locator("#train-progress").inner_text())

    # The server's CPU while this tab watches the run (ticks once a second).
    server_proc = psutil.Process(server.proc.pid)
    cpu0, t0 = sum(server_proc.cpu_times()[:2]), time.monotonic()
    time.sleep(10)
    cpu_share = (sum(server_proc.cpu_times()[:2]) - cpu0) / (time.monotonic() - t0)
    print(f"\nweb server CPU while one tab watches a run: {cpu_share * 100:.1f}% of a core")
    shot(page, "train-running")

    seen = points(page)
    page.reload()
    page.wait_for_selector("#train-start")
    # Reattached with the full history, not just what arrives from now on.
    wait_until(lambda: points(page) >= seen, 15, "the reloaded chart to show the history")
    # The chart may trail the file by the steps of one tick (a few per second on the demo).
    wait_until(lambda: points(page) >= loss_lines(run_dir) - 8, 10, "the chart to catch up")
    after_reload = points(page)
    wait_until(lambda: points(page) > after_reload, 60, "new points after the reload")
    shot(page, "train-after-reload")

    wait_until(lambda: runs.last_checkpoint(run_dir), 120, "a checkpoint")
    page.click("#train-abort")
    wait_until(lambda: "aborted" in status_text(page), 30, "the page to show aborted")
    status = json.loads((run_dir / runs.STATUS).read_text())
    assert status["state"] == "aborted"
    wait_until(lambda: not runs.pid_alive(status["pid"]), 15, "the trainer to exit")
    assert runs.last_checkpoint(run_dir) is not None   # the last checkpoint is kept
    wait_until(lambda: [run_dir.name, "aborted"] in [r[:2] for r in table_rows(page)], 20,
               "the runs list to show aborted")
    shot(page, "train-aborted")

    # Resume continues the same run folder from its last checkpoint.
    resumed_from = int(runs.last_checkpoint(run_dir).name.split("-")[1])
    page.click("#train-resume")
    wait_until(lambda: "running" in status_text(page), 20, "the resumed run")
    wait_until(lambda: last_step(run_dir) > resumed_from + 1, 120, "steps after the checkpoint")
    page.click("#train-abort")
    wait_until(lambda: "aborted" in status_text(page), 30, "the second abort")
    assert cpu_share < 0.5, f"the page server used {cpu_share:.0%} of a core"


def test_a_run_finishes_and_appears_completed(page, server):
    run_dir = start_run(page, server, **{"train-epochs": 2, "identity-name": "Zorblax"})
    wait_until(lambda: "completed" in status_text(page) or "failed" in status_text(page), 240,
               "the run to finish", interval=1)
    assert "completed" in status_text(page), status_text(page)
    assert "100%" in page.locator("#train-progress").inner_text()
    wait_until(lambda: points(page) == loss_lines(run_dir), 10, "every point on the chart")
    row = next(r for r in table_rows(page) if r[0] == run_dir.name)
    assert row[1] == "completed" and re.fullmatch(r"\d+\.\d{4}", row[3])  # the final loss
    assert (run_dir / "final").is_dir()
    shot(page, "train-completed")

    # Any past run opens from the runs list, with its own curve and state.
    aborted = next(r[0] for r in table_rows(page) if r[1] == "aborted")
    choose(page, "train-run", aborted)
    wait_until(lambda: aborted in status_text(page) and "aborted" in status_text(page), 10,
               "the aborted run to be shown")
    wait_until(lambda: points(page) == loss_lines(server.saves / aborted), 10, "its curve")


def test_the_form_follows_the_model_and_survives_a_reload(page, server):
    """The note under the form names what the model recommends; switching the method moves
    the values still at the old recommendation; a reload shows what was last saved."""
    note = lambda: text_of(page, "train-recommended")
    assert "Recommended by" in note() and "learning_rate 0.002" in note()
    choose(page, "train-method", "full")
    lr = page.locator("#train-lr input")
    wait_until(lambda: lr.input_value() == "0.0005", 15, "the full-tuning recommendation")
    assert "for sft/full" in note()
    choose(page, "train-method", "lora")
    wait_until(lambda: lr.input_value() == "0.002", 15, "the LoRA recommendation again")
    fill(page, "identity-name", "Restoria")
    fill(page, "train-config-name", "restoria")
    page.click("#train-config-save")
    wait_until(lambda: "Saved" in text_of(page, "train-config-msg"), 10, "saving")
    page.reload()
    page.wait_for_selector("#train-start")
    name = page.locator("#identity-name input")
    wait_until(lambda: name.input_value() == "Restoria", 15, "the saved form after a reload")
    shot(page, "train-form-restored")
