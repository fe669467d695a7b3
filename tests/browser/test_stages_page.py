"""A preference stage from the page, as a user runs it: choose dpo, start, watch its signals.

Drives `tunebench webui` (a subprocess, in its own scratch project) with Chromium and
trains the demo model with DPO for real, on the bundled identity_pref pairs. Two epochs
keep it short (the demo recommends ten). The closing screenshot goes to the test's tmp
folder and to $TUNEBENCH_STAGE_SHOTS (default /tmp/shots-stages).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from page_helpers import (RAW_COLOR, SMOOTH_COLOR, checkboxes, choose, chosen, points,
                          shown, start_run, status_text, table_rows, text_of, wait_until)

from core import plot, runs
from webui import train_tab

pytestmark = [pytest.mark.browser, pytest.mark.train]
STAGE_SHOTS = Path(os.environ.get("TUNEBENCH_STAGE_SHOTS", "/tmp/shots-stages"))


def signal_lines(run_dir: Path, name: str) -> int:
    return sum(1 for r in runs.read_metrics(run_dir) if name in r)


def test_dpo_run_from_the_page_shows_its_signals(page, server, tmp_path):
    started = time.monotonic()
    command = lambda: page.locator("#train-command").inner_text()
    assert "identity" in chosen(page, "train-dataset")        # the first job: sft on identity
    assert not shown(page, "train-pref-beta") and not shown(page, "train-signal-plot")

    # Choosing the stage brings its datasets, its settings and its recommendations.
    choose(page, "train-stage", "dpo")
    wait_until(lambda: "stage: dpo" in command(), 15, "the command box to follow the stage")
    wait_until(lambda: chosen(page, "train-dataset") == ["identity_pref"], 15,
               "the dataset to switch to identity_pref")
    note = text_of(page, "train-dataset-note")
    assert "dpo" in note and "replaced identity with identity_pref" in note, note
    assert shown(page, "train-pref-beta") and shown(page, "train-pref-loss")
    assert shown(page, "train-pref-ftx")
    assert not shown(page, "train-reward-model") and not shown(page, "train-num-generations")
    epochs = page.locator("#train-epochs input")
    # The demo's DPO recommendation lands before the epochs are typed, so it cannot undo them.
    wait_until(lambda: epochs.input_value() == "10", 15, "the demo's dpo recommendation")
    assert "for dpo/lora" in text_of(page, "train-recommended")

    run_dir = start_run(page, server, **{"train-epochs": 2})
    assert "stage: dpo" in (run_dir / runs.CONFIG).read_text()
    assert "epochs: 2" in (run_dir / runs.CONFIG).read_text()
    wait_until(lambda: "completed" in status_text(page) or "failed" in status_text(page), 150,
               "the run to finish", interval=1)
    assert "completed" in status_text(page), status_text(page)
    trained_s = time.monotonic() - started

    # The picker lists the signals DPO logged, the headline ones ticked.
    wait_until(lambda: shown(page, "train-signal-plot"), 10, "the signal charts")
    options = dict(checkboxes(page, "train-series"))
    for name in ("reward_margin", "reward_accuracy", "reward_chosen", "reward_rejected"):
        assert plot.signal_label(name) in options, (name, options)
    ticked = [label for label, on in options.items() if on]
    assert ticked == [plot.signal_label(n) for n in plot.HEADLINE["dpo"]], ticked

    # One chart per ticked signal, labelled, each with every logged point.
    for i, name in enumerate(plot.HEADLINE["dpo"], start=1):
        chart = f"train-signal-plot-{i}"
        assert shown(page, chart)
        assert plot.signal_label(name) in text_of(page, chart)
        logged = signal_lines(run_dir, name)
        assert logged >= 10, logged  # 52 pairs, batch 8: 7 steps an epoch, a line a step
        wait_until(lambda: points(page, RAW_COLOR, chart) == logged, 10, f"every {name} point")
        assert points(page, SMOOTH_COLOR, chart) == logged
    for i in range(len(plot.HEADLINE["dpo"]) + 1, train_tab.SIGNAL_PANELS + 1):
        assert not shown(page, f"train-signal-plot-{i}")

    # Ticking one more signal adds its chart.
    page.locator("#train-series label", has_text=plot.signal_label("reward_chosen")).click()
    chart = f"train-signal-plot-{len(plot.HEADLINE['dpo']) + 1}"
    wait_until(lambda: shown(page, chart) and points(page, RAW_COLOR, chart) ==
               signal_lines(run_dir, "reward_chosen"), 10, "the reward_chosen chart")
    assert plot.signal_label("reward_chosen") in text_of(page, chart)

    # The runs list names the stage.
    stage_col = train_tab.RUN_COLUMNS.index("stage")
    wait_until(lambda: any(r[0] == run_dir.name for r in table_rows(page)), 20, "the runs list")
    row = next(r for r in table_rows(page) if r[0] == run_dir.name)
    assert row[1] == "completed" and row[stage_col] == "dpo", row

    page.locator("#train-signal-plot").scroll_into_view_if_needed()
    path = tmp_path / "dpo-page.png"
    page.screenshot(path=str(path), full_page=True)
    STAGE_SHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, STAGE_SHOTS / "dpo-page.png")
    print(f"\ndpo from the page: {trained_s:.1f} s to completed, "
          f"{time.monotonic() - started:.1f} s in all; screenshot {STAGE_SHOTS / 'dpo-page.png'}")
