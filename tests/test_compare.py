"""Comparing runs (core/compare.py) on two real tiny runs that differ in learning_rate only:
the settings table, the curves on each x axis, live re-reading, notes and tags, the filter."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core import compare, runs
from core.errors import BadInput

REPO = Path(__file__).resolve().parents[1]
QUICK = ["dataset=identity", f"dataset_dir={REPO / 'data'}", "max_samples=16", "batch_size=4",
         "epochs=1", "lora_rank=8", "val_size=0.25"]
RATES = {"lr-small": "1e-3", "lr-big": "3e-3"}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, demo_model_path) -> list[Path]:
    """Two completed runs of the demo model, trained side by side, differing in
    learning_rate."""
    saves = tmp_path_factory.mktemp("compare") / "saves"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "core", "train", f"model={demo_model_path}",
         f"output_dir={saves / name}", f"learning_rate={rate}", *QUICK],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
        for name, rate in RATES.items()]
    for proc in procs:
        out = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, out[-3000:]
    return [saves / name for name in RATES]


def test_table_holds_the_differing_setting_and_final_metrics(two_runs):
    comparison = compare.Comparison(two_runs)
    assert comparison.refresh()
    differ = dict(comparison.differing_settings())
    assert list(differ) == ["learning_rate"], differ  # output_dir and run_name are identity
    assert differ["learning_rate"] == ["0.001", "0.003"]
    columns, rows = comparison.table()
    assert columns == ["", "lr-small", "lr-big"]
    table = {row[0]: row[1:] for row in rows}
    assert table["state"] == ["completed", "completed"]
    assert "lora_rank" not in table and "model" not in table
    records = runs.read_metrics(two_runs[0])
    assert table["steps"][0] == f"{records[-1]['step']}/{records[-1]['total_steps']}"
    best = min(r["eval_loss"] for r in records if "eval_loss" in r)
    assert table["best eval loss"][0] == f"{best:.4f}"
    assert table["last loss"][0] == f"{[r['loss'] for r in records if 'loss' in r][-1]:.4f}"


@pytest.mark.parametrize("axis", ["step", "tokens", "time"])
def test_curves_on_each_axis(two_runs, axis):
    comparison = compare.Comparison(two_runs)
    comparison.refresh()
    assert [m for _, m in comparison.metrics()] == ["loss", "eval_loss", "learning_rate"]
    for run_dir in two_runs:
        records = runs.read_metrics(run_dir)
        run = comparison.runs[run_dir]
        for metric in ("loss", "eval_loss"):
            xs, ys = run.curve(metric, axis)
            assert len(xs) == len(ys) == sum(metric in r for r in records) > 0
            assert xs == sorted(xs), (metric, axis, xs)
            assert ys == [r[metric] for r in records if metric in r]
        if axis == "tokens":  # the tokens seen when each loss line was written
            assert run.curve("loss", axis)[0] == [r["num_tokens"] for r in records
                                                  if "loss" in r]
    rows = comparison.rows("loss", axis)
    assert {name for _, _, name in rows} == set(RATES)
    assert comparison.missing("loss", axis) == []


def test_a_live_run_is_read_again_only_when_it_changed(two_runs, tmp_path):
    live = tmp_path / "live"
    shutil.copytree(two_runs[0], live, ignore=shutil.ignore_patterns("final", "checkpoint-*"))
    comparison = compare.Comparison([live, two_runs[1]])
    assert comparison.refresh()
    assert not comparison.refresh()  # nothing changed: nothing is re-read
    before = comparison.runs[live].curve("loss", "step")
    last = runs.read_metrics(live)[-1]
    runs.append_metrics(live, {"step": last["step"] + 1, "total_steps": last["step"] + 1,
                               "elapsed_s": last["elapsed_s"] + 1.0, "loss": 1.5,
                               "num_tokens": 10_000})
    assert comparison.refresh()
    after = comparison.runs[live].curve("loss", "step")
    assert after[0] == before[0] + [last["step"] + 1] and after[1][-1] == 1.5
    assert comparison.runs[live].curve("loss", "tokens")[0][-1] == 10_000


def test_notes_and_tags_round_trip_and_filter(two_runs, tmp_path):
    run = tmp_path / "saves" / "noted"
    shutil.copytree(two_runs[0], run, ignore=shutil.ignore_patterns("final", "checkpoint-*"))
    assert compare.read_notes(run) == {"note": "", "tags": []}
    saved = compare.write_notes(run, "  higher rate diverges  ", "baseline, lr  baseline")
    assert saved == {"note": "higher rate diverges", "tags": ["baseline", "lr"]}
    assert json.loads((run / compare.NOTES).read_text()) == saved
    assert compare.read_notes(run) == saved
    assert compare.matches(run, "tag:baseline") and compare.matches(run, "#lr")
    assert compare.matches(run, "DIVERGES noted")          # note and name, any case
    assert not compare.matches(run, "tag:base")            # a tag matches whole
    assert not compare.matches(run, "baseline tag:other")  # every word must match
    assert compare.matches(run, "")
    with pytest.raises(BadInput, match="tags"):
        compare.write_notes(run, "", [f"t{i}" for i in range(compare.MAX_TAGS + 1)])
    with pytest.raises(BadInput, match="not a run folder"):
        compare.write_notes(tmp_path, "x", "")
    # A comparison that holds the run sees the new note on its next refresh.
    comparison = compare.Comparison([run])
    comparison.refresh()
    compare.write_notes(run, "second", "")
    assert comparison.refresh() and comparison.runs[run].notes["note"] == "second"


def test_runs_list_filter(two_runs, tmp_path):
    from webui import runs_view

    saves = tmp_path / "saves"
    for src in two_runs:
        shutil.copytree(src, saves / src.name, ignore=shutil.ignore_patterns("final",
                                                                            "checkpoint-*"))
    compare.write_notes(saves / "lr-big", "too fast", ["sweep", "diverged"])
    compare.write_notes(saves / "lr-small", "", ["sweep"])
    names = lambda query: sorted(r[0] for r in runs_view.runs_table(saves, query))  # noqa: E731
    assert names("") == ["lr-big", "lr-small"]
    assert names("tag:sweep") == ["lr-big", "lr-small"]
    assert names("tag:diverged") == ["lr-big"]
    assert names("fast") == ["lr-big"]
    assert names("small") == ["lr-small"]
    assert names("tag:nothing") == []


@pytest.fixture(scope="module")
def eval_job(two_runs) -> Path:
    """A loss evaluation of the first run's final/, a job in the same saves folder."""
    job = two_runs[0].parent / "eval-lr-small"
    proc = subprocess.run(
        [sys.executable, "-m", "core", "eval", f"adapter={two_runs[0] / 'final'}",
         "eval_task=loss", "dataset=identity", f"dataset_dir={REPO / 'data'}", "max_samples=8",
         "compare_base=false", f"output_dir={job}"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=REPO,
        timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return job


def test_table_holds_eval_results_of_the_runs(two_runs, eval_job):
    comparison = compare.Comparison(two_runs)
    comparison.refresh()
    rows = {row[0]: row[1:] for row in comparison.table(two_runs[0].parent)[1]}
    results = json.loads((eval_job / "results.json").read_text())
    assert rows["eval: loss"][0].startswith(f"loss {results['model']['loss']:.4g}, perplexity")
    assert rows["eval: loss"][1] == "–"  # the other run was not evaluated


def test_panel_picks_draws_and_ticks_only_on_change(two_runs, eval_job):
    import gradio as gr

    from webui import compare_view

    saves = two_runs[0].parent
    assert sorted(compare_view.train_run_choices(saves)) == ["lr-big", "lr-small"]  # no eval
    with gr.Blocks():
        panel_ui = compare_view.ComparePanel(saves)
    panel = compare_view.Panel()
    assert panel_ui.tick(panel) == [gr.skip()] * 4  # nothing picked: nothing read or sent
    chart, chooser, table, note = panel_ui.on_pick(panel, ["lr-small", "lr-big"])
    frame = chart["value"]
    assert sorted(set(frame["run"])) == ["lr-big", "lr-small"]
    assert set(chart["color_map"]) == {"lr-big", "lr-small"}
    assert "learning_rate" in list(table.iloc[:, 0]) and "eval: loss" in list(table.iloc[:, 0])
    assert [m for _, m in chooser["choices"]] == ["loss", "eval_loss", "learning_rate"]
    assert note == ""
    assert panel_ui.tick(panel) == [gr.skip()] * 4  # ended runs, unchanged files
    chart = panel_ui.on_axis(panel, "time")[0]
    assert chart["label"] == "loss by time (s)" and frame["x"].max() < 10  # steps before


def test_terminal_table_and_note(two_runs, tmp_path, capsys):
    run = tmp_path / "cli-run"
    shutil.copytree(two_runs[0], run, ignore=shutil.ignore_patterns("final", "checkpoint-*"))
    assert compare.main([str(run), "--note", "from the shell", "--tags", "a,b"]) == 0
    assert compare.read_notes(run) == {"note": "from the shell", "tags": ["a", "b"]}
    capsys.readouterr()
    assert compare.main([str(run), str(two_runs[1])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["cli-run", "lr-big"]
    assert next(line for line in lines if line.startswith("learning_rate")).split()[1:] == [
        "0.001", "0.003"]
    assert compare.main([str(tmp_path)]) == 2  # not a run folder: a message, no traceback


def test_a_long_curve_is_thinned_for_the_chart_keeping_its_last_point(two_runs, tmp_path):
    from webui import compare_view, runs_view

    run = tmp_path / "long"
    shutil.copytree(two_runs[0], run, ignore=shutil.ignore_patterns("final", "checkpoint-*"))
    start = runs.read_metrics(run)[-1]["step"] + 1
    with open(run / runs.METRICS, "a", encoding="utf-8") as fh:  # as a long run appends
        for step in range(start, start + 3 * runs_view.MAX_POINTS):
            fh.write(json.dumps({"step": step, "elapsed_s": step / 10, "loss": 1 / step}) + "\n")
    comparison = compare.Comparison([run])
    comparison.refresh()
    rows = compare_view.thinned_rows(comparison, "loss", "time")
    assert runs_view.MAX_POINTS // 2 < len(rows) <= runs_view.MAX_POINTS + 1
    assert rows[-1][0] == (start + 3 * runs_view.MAX_POINTS - 1) / 10
