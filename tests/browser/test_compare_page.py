"""Comparing runs in the Train tab, as a user does it: two runs trained with the CLI into the
server's saves/ (differing in learning_rate), ticked in the compare picker; the chart shows
both curves and the table the setting that differs. Notes and tags, and the runs filter.

The screenshot goes to $TUNEBENCH_SHOTS (default /tmp/shots) as compare-runs.png.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from page_helpers import choose, chosen, fill, shot, table_rows, text_of, wait_until

from core import compare, runs
from webui import compare_view

pytestmark = [pytest.mark.browser, pytest.mark.train]
REPO = Path(__file__).resolve().parents[2]
RATES = {"cmp-slow": "1e-3", "cmp-fast": "3e-3"}


@pytest.fixture(scope="module")
def training(tmp_path_factory, demo_model_path) -> dict[str, tuple]:
    """Two tiny runs started side by side with `tunebench train` (before the server, so
    they train while it starts), differing in learning_rate."""
    where = tmp_path_factory.mktemp("compare-runs")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return {name: (where / name, subprocess.Popen(
        [sys.executable, "-m", "core", "train", f"model={demo_model_path}",
         f"output_dir={where / name}", f"learning_rate={rate}", "dataset=identity",
         f"dataset_dir={REPO / 'data'}", "max_samples=16", "batch_size=4", "epochs=1",
         "lora_rank=8", "val_size=0.25"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO))
        for name, rate in RATES.items()}


@pytest.fixture(scope="module")
def two_runs(training, server) -> list[Path]:
    """The two runs, once trained, in the server's saves/."""
    out = []
    for name, (run_dir, proc) in training.items():
        log = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, log[-3000:]
        out.append(Path(shutil.copytree(run_dir, server.saves / name)))
    return out


def pick(page, elem_id: str, option: str) -> None:
    """Tick one option of a radio group, by its exact label."""
    page.locator(f"#{elem_id}").get_by_label(option, exact=True).check()


def drawn_lines(page, chart: str) -> dict[str, int]:
    """{stroke colour: points} of the lines a chart draws."""
    return page.evaluate("""(chart) => Object.fromEntries(
        [...document.querySelectorAll(`#${chart} g.mark-line path`)]
          .filter(p => (p.getAttribute('d') || '').length > 0)
          .map(p => [p.getAttribute('stroke'), p.getAttribute('d').split('L').length]))""",
                         chart)


def axis_numbers(page, chart: str) -> list[float]:
    """The numbers an x axis labels its ticks with."""
    labels = page.evaluate("""(chart) => [...document.querySelectorAll(
        `#${chart} .role-axis-label text`)].map(t => t.textContent)""", chart)
    out = []
    for label in labels:
        try:
            out.append(float(label.replace(",", "")))
        except ValueError:
            pass
    return out or [0.0]


def test_compare_two_runs_notes_and_filter(two_runs, page):
    # The picker offers the runs when opened (the page fills its choices once loaded, and
    # again on focus); tick both.
    for name in RATES:
        wait_until(lambda: choose(page, "train-compare-runs", name) or
                   name in chosen(page, "train-compare-runs"), 15, f"{name} ticked", interval=1)
    wait_until(lambda: sorted(chosen(page, "train-compare-runs")) == sorted(RATES), 15,
               "both runs ticked")
    wait_until(lambda: len(drawn_lines(page, "train-compare-plot")) == 2, 20,
               "two curves in the comparison chart")
    legend = text_of(page, "train-compare-plot")
    assert all(name in legend for name in RATES), legend
    table = text_of(page, "train-compare-table")
    assert "learning_rate" in table and "0.001" in table and "0.003" in table, table
    assert "lora_rank" not in table and "best eval loss" in table, table

    # Another curve, and tokens on the x axis: still one line per run.
    pick(page, "train-compare-metric", "eval loss")
    pick(page, "train-compare-x", "tokens seen")
    wait_until(lambda: "eval loss by tokens seen" in text_of(page, "train-compare-plot"), 15,
               "the chart to show eval loss by tokens")
    wait_until(lambda: len(drawn_lines(page, "train-compare-plot")) == 2, 15,
               "two eval curves")
    # The x axis counts tokens now (hundreds per step), not steps (1 to 3).
    wait_until(lambda: max(axis_numbers(page, "train-compare-plot")) >= 100, 15,
               "tokens on the x axis")
    page.locator("#train-compare").screenshot(path=str(shot(page, "compare-runs-page").with_name(
        "compare-runs.png")))

    # A run that writes another line is drawn again by the Train tab's tick (as a live
    # run's curve grows), with nothing clicked.
    pick(page, "train-compare-metric", "loss")
    pick(page, "train-compare-x", "steps")
    slow = compare_view.PALETTE[0]  # the run picked first
    wait_until(lambda: "eval loss" not in text_of(page, "train-compare-plot")
               and "loss by step" in text_of(page, "train-compare-plot")
               and drawn_lines(page, "train-compare-plot").get(slow), 15, "loss by step")
    before = drawn_lines(page, "train-compare-plot")[slow]
    last = runs.read_metrics(two_runs[0])[-1]
    runs.append_metrics(two_runs[0], {"step": last["step"] + 1, "total_steps": last["step"] + 1,
                                      "elapsed_s": last["elapsed_s"] + 1, "loss": 3.5})
    wait_until(lambda: drawn_lines(page, "train-compare-plot")[slow] == before + 1, 15,
               "the new point drawn by the tick")

    # A note and tags on the run shown, then the runs list filtered by a tag.
    choose(page, "train-run", "cmp-fast")
    wait_until(lambda: "cmp-fast" in text_of(page, "train-status"), 15, "cmp-fast shown")
    fill(page, "train-run-note", "the faster rate")
    fill(page, "train-run-tags", "sweep, fast")
    page.click("#train-run-note-save")
    wait_until(lambda: "Saved the note" in text_of(page, "train-run-note-msg"), 15,
               "the note saved")
    assert compare.read_notes(two_runs[1]) == {"note": "the faster rate",
                                                 "tags": ["sweep", "fast"]}
    fill(page, "train-runs-filter", "tag:fast")
    wait_until(lambda: [r[0] for r in table_rows(page)] == ["cmp-fast"], 15,
               "the runs list filtered to the tagged run")
