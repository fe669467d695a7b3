"""What the Train tab shows about a run, read incrementally from the run directory."""

from __future__ import annotations

import json
import os

import gradio as gr
import pytest

from core import config as cfg
from core import runs
from core.errors import BadInput
from webui import runs_view, train_tab
from webui.runs_view import Watch

SKIP = gr.skip()


def record(step: int, total: int = 10, **extra) -> dict:
    return {"step": step, "total_steps": total, "epoch": step / 5, "elapsed_s": step * 2.0,
            "eta_s": (total - step) * 2.0, **extra}


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "saves" / "lora-1"
    run.mkdir(parents=True)
    runs.write_status(run, "running", pid=os.getpid())  # this test process stands in as trainer
    return run


def test_poll_reads_only_what_was_appended(run_dir):
    runs.append_metrics(run_dir, record(1, loss=2.0, tokens_per_s=100.0))
    (run_dir / runs.LOG).write_text("loading\n")
    watch = Watch(run_dir)
    first = watch.poll()
    assert first.status["state"] == "running" and len(first.metrics) == 1 and "loading" in first.log
    assert not watch.poll()  # nothing changed: nothing to redraw
    with open(run_dir / runs.METRICS, "a") as fh:
        fh.write(json.dumps(record(2, loss=1.5)) + "\n" + '{"step": 3, "lo')  # a torn last line
    changes = watch.poll()
    assert [r["step"] for r in changes.metrics] == [1, 2] and changes.status is None
    assert changes.log is None
    assert watch.tail.offset < (run_dir / runs.METRICS).stat().st_size  # the torn line waits
    with open(run_dir / runs.METRICS, "a") as fh:
        fh.write('ss": 1.0, "total_steps": 10}\n')
    assert [r["step"] for r in watch.poll().metrics] == [1, 2, 3]
    assert watch.tail.offset == (run_dir / runs.METRICS).stat().st_size


def test_poll_notices_a_trainer_that_died_silently(run_dir):
    runs.write_status(run_dir, "running", pid=2**22 + 12345)  # no such process
    watch = Watch(run_dir)
    assert watch.poll().status["state"] == "failed"
    assert "disappeared" in watch.status["error"]


def test_smoothed_history_never_shifts_and_eval_points_are_drawn():
    records = [record(i, 100, loss=3.0 / i) for i in range(1, 40)]
    records.append(record(39, 100, eval_loss=0.5))
    frame = runs_view.loss_frame(records, 0.9)
    smoothed = frame[frame.series == "smoothed loss"].loss.tolist()
    assert smoothed == pytest.approx(runs.smooth([3.0 / i for i in range(1, 40)], 0.9))
    more = runs_view.loss_frame(records + [record(40, 100, loss=9.0)], 0.9)
    assert more[more.series == "smoothed loss"].loss.tolist()[:39] == pytest.approx(smoothed)
    assert frame[frame.series == "eval loss"].values.tolist() == [[39, 0.5, "eval loss"]]


def test_long_runs_are_thinned_but_keep_their_last_point():
    records = [record(i, 10_000, loss=1.0 + 1 / i) for i in range(1, 5001)]
    frame = runs_view.loss_frame(records, 0.9)
    raw = frame[frame.series == "loss"]
    assert len(raw) <= runs_view.MAX_POINTS + 1 and raw.step.iloc[-1] == 5000


def test_progress_shows_step_epoch_times_throughput_and_padding():
    status = {"state": "running", "phase": "training"}
    text = runs_view.progress_html(status, [
        record(3, loss=1.0, tokens_per_s=1234.0, nonpad_share=0.7468), record(3, eval_loss=0.9)])
    for part in ("30%", "step 3/10", "epoch 0.60", "elapsed 0:06", "ETA 0:14", "1,234 tokens/s",
                 "eval loss 0.9000", "75% non-padding"):
        assert part in text
    done = runs_view.progress_html({"state": "completed"}, [record(10)])
    assert "100%" in done and "ETA" not in done
    assert "loading model" in runs_view.progress_html(
        {"state": "running", "phase": "loading model"}, [])


def test_a_failed_run_shows_its_error_and_an_abort_is_no_error(run_dir):
    status = runs.write_status(run_dir, "failed", error="data.jsonl, record 2: <bad> & worse")
    text = runs_view.status_html(run_dir, status)
    assert "tb-error" in text and "record 2: &lt;bad&gt; &amp; worse" in text
    aborted = runs_view.status_html(run_dir, {"state": "aborted", "error": "stopped by the user"})
    assert "tb-note" in aborted and "tb-error" not in aborted


def test_runs_table_lists_state_steps_and_final_loss(run_dir):
    runs.append_metrics(run_dir, record(4, loss=0.75))
    runs.write_status(run_dir, "completed", exit_code=0)
    empty = run_dir.parent / "lora-2"
    empty.mkdir()
    runs.write_status(empty, "failed", pid=os.getpid(), error="boom")
    rows = {r[0]: r for r in runs_view.runs_table(run_dir.parent)}
    assert rows["lora-1"][1:4] == ["completed", "4/10", "0.7500"]
    assert rows["lora-2"][1] == "failed" and rows["lora-2"][3] == "–"


def test_a_tick_with_nothing_new_redraws_nothing(run_dir):
    with gr.Blocks():
        tab = train_tab.TrainTab(run_dir.parent)
    session = train_tab.Session()
    runs.append_metrics(run_dir, record(1, loss=2.0))
    first = tab.tick(session)  # no run shown yet: follows the running one
    assert session.watch.run_dir == run_dir and "lora-1" in first[0]
    assert len(first[2]) == 2  # raw and smoothed point
    assert tab.tick(session) == [SKIP] * 6
    runs.append_metrics(run_dir, record(2, loss=1.0))
    out = tab.tick(session)
    assert out[0] == SKIP and out[2] is not SKIP and len(out[2]) == 4 and out[3] == SKIP


def test_start_checks_paths_and_data_before_launching(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset_info.json").write_text("{}")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.jsonl"
    outside.write_text('{"instruction": "q", "output": "a"}\n')
    with pytest.raises(BadInput, match="outside the allowed folders"):
        train_tab.check_inputs(cfg.TrainConfig(dataset=[str(outside)]))
    broken = tmp_path / "data" / "broken.jsonl"
    broken.write_text('{"instruction": "q", "output": "a"}\n{"instruction": 1}\n')
    with pytest.raises(BadInput, match="record 2"):
        train_tab.check_inputs(cfg.TrainConfig(dataset=["broken.jsonl"]))
    with pytest.raises(BadInput, match="outside the allowed folders"):
        train_tab.check_inputs(cfg.TrainConfig(dataset=["broken.jsonl"], output_dir="/tmp/x"))


def test_an_ended_run_is_summarised_once_until_its_files_change(run_dir):
    runs.append_metrics(run_dir, record(10, loss=1.5))
    runs.write_status(run_dir, "completed", exit_code=0)
    first = runs.summarize(run_dir)
    assert first.state == "completed" and first.final_loss == 1.5
    assert runs.summarize(run_dir) is first  # many tabs listing runs read it once
    runs.write_status(run_dir, "running", pid=os.getpid())  # resumed
    runs.append_metrics(run_dir, record(11, total=20, loss=1.2))
    again = runs.summarize(run_dir)
    assert again.state == "running" and again.final_loss == 1.2 and again.steps == "11/20"
    assert runs.summarize(run_dir) is not again  # a running run is always read afresh
