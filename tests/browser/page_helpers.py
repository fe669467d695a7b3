"""What the browser tests do to the page, written once: fill, choose, wait, read, screenshot.

The Train tab's readers (the chart's points, the runs list, the status line) live
here too, because both the Train tab tests and the fault tests watch runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from core import runs
from webui.runs_view import COLORS, SERIES
from webui import train_tab

SHOTS = Path(os.environ.get("TUNEBENCH_SHOTS", "/tmp/shots"))
RAW_COLOR = COLORS[SERIES["raw"]]          # how the chart's SVG paths are told apart
SMOOTH_COLOR = COLORS[SERIES["smoothed"]]


def shot(page, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def wait_until(predicate, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def fill(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    box.fill(str(value))
    box.press("Tab")


def choose(page, elem_id: str, option: str) -> None:
    """Pick an option of a Gradio dropdown the way a person does: type, then Enter."""
    box = page.locator(f"#{elem_id} input").first
    box.click()
    box.fill(option)
    box.press("Enter")
    box.press("Escape")


def text_of(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id}").inner_text()


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


# --- the Train tab's run view ------------------------------------------------------

def points(page, color: str = RAW_COLOR, chart: str = "train-loss-plot") -> int:
    """How many points a chart draws for one series (vertices of its SVG path); the loss
    chart unless `chart` names another (a signal panel: train-signal-plot-1, ...)."""
    return page.evaluate("""([color, chart]) => {
        const line = [...document.querySelectorAll(`#${chart} g.mark-line path`)]
            .find(p => p.getAttribute('stroke') === color);
        const d = line ? (line.getAttribute('d') || '') : '';
        return d ? d.split('L').length : 0;
    }""", [color, chart])


def shown(page, elem_id: str) -> bool:
    """Whether an element is on the page and visible (a hidden Gradio component is
    either not rendered or not displayed: both read as False)."""
    box = page.locator(f"#{elem_id}")
    return box.count() > 0 and box.first.is_visible()


def checkboxes(page, elem_id: str) -> list[tuple[str, bool]]:
    """A checkbox group's options as (label, ticked), in the order shown."""
    return page.evaluate("""(id) => [...document.querySelectorAll(`#${id} label`)]
        .filter(l => l.querySelector('input[type=checkbox]'))
        .map(l => [l.innerText.trim(), l.querySelector('input[type=checkbox]').checked])
    """, elem_id)


def chosen(page, elem_id: str) -> list[str]:
    """What a multiselect dropdown holds (its tokens)."""
    return [t.strip() for t in page.locator(f"#{elem_id} .token").all_inner_texts()]


def status_text(page) -> str:
    return text_of(page, "train-status")


def table_rows(page) -> list[list[str]]:
    """The runs list as rows of cells (the grid renders each cell on its own line)."""
    lines = [line.strip() for line in text_of(page, "train-runs").splitlines()]
    lines = [line for line in lines if line]
    cells = lines[lines.index("started") + 1:]
    width = len(train_tab.RUN_COLUMNS)
    return [cells[i:i + width] for i in range(0, len(cells), width)]


def last_step(run_dir: Path) -> int:
    records = runs.read_metrics(run_dir)
    return records[-1]["step"] if records else -1


def loss_lines(run_dir: Path) -> int:
    return sum(1 for r in runs.read_metrics(run_dir) if "loss" in r)


def run_dirs(saves: Path) -> list[Path]:
    return sorted(p for p in saves.iterdir() if (p / runs.STATUS).exists())


def start_run(page, server, **fields) -> Path:
    """Fill the form (model first), press Start, and return the new run folder."""
    before = set(run_dirs(server.saves))
    fill(page, "train-model", server.model)
    for elem_id, value in fields.items():
        fill(page, elem_id, value)
    page.click("#train-start")
    try:
        new = wait_until(lambda: set(run_dirs(server.saves)) - before, 20, "a new run folder")
    except AssertionError as err:  # say what the page says instead (a refusal, say)
        raise AssertionError(f"{err}; the page's status: {status_text(page)!r}") from None
    run_dir = new.pop()
    wait_until(lambda: run_dir.name in status_text(page), 20, "the page to show the run")
    return run_dir
