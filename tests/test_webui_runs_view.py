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


def test_every_frame_names_every_series_so_colours_never_change():
    """Gradio's chart keeps the colours of the series in the first frame it draws; a
    series that appears later (eval points) must already be named, without a value."""
    for records in ([], [record(1, loss=2.0)], [record(1, loss=2.0), record(1, eval_loss=1.5)]):
        frame = runs_view.loss_frame(records, 0.9)
        assert list(dict.fromkeys(frame.series)) == list(runs_view.SERIES.values())
    frame = runs_view.loss_frame([record(1, loss=2.0)], 0.9)
    assert frame[frame.series == "eval loss"].loss.isna().all()


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
    (run_dir / runs.CONFIG).write_text("stage: dpo\n")
    rows = {r[0]: r for r in runs_view.runs_table(run_dir.parent)}
    assert rows["lora-1"][1:5] == ["completed", "4/10", "0.7500", "dpo"]
    assert rows["lora-2"][1] == "failed" and rows["lora-2"][3] == "–"
    assert rows["lora-2"][4] == "?"  # no config.yaml: the stage is unknown
    assert len(rows["lora-1"]) == len(train_tab.RUN_COLUMNS)


def test_a_tick_with_nothing_new_redraws_nothing(run_dir):
    with gr.Blocks():
        tab = train_tab.TrainTab(run_dir.parent)
    session = train_tab.Session()
    runs.append_metrics(run_dir, record(1, loss=2.0))
    first = tab.tick(session)  # no run shown yet: follows the running one
    assert session.watch.run_dir == run_dir and "lora-1" in first[0]
    assert len(first[2].dropna()) == 2  # raw and smoothed point
    n_out = len(tab.view_outputs) + 2
    assert tab.tick(session) == [SKIP] * n_out
    runs.append_metrics(run_dir, record(2, loss=1.0))
    out = tab.tick(session)
    assert len(out) == n_out
    assert out[0] == SKIP and out[2] is not SKIP and len(out[2].dropna()) == 4
    assert out[3] == SKIP


def dpo_record(step: int, **extra) -> dict:
    return record(step, 100, loss=0.69 - step / 100, reward_margin=step * 0.5,
                  reward_accuracy=min(1.0, step / 10), reward_chosen=step * 0.3,
                  reward_rejected=-step * 0.2, **extra)


def test_a_dpo_run_draws_its_signals_next_to_the_loss(run_dir):
    (run_dir / runs.CONFIG).write_text("stage: dpo\nmethod: lora\n")
    with gr.Blocks():
        tab = train_tab.TrainTab(run_dir.parent)
    session = train_tab.Session()
    runs.append_metrics(run_dir, dpo_record(1))
    out = dict(zip(tab.view_outputs, tab.tick(session)))
    assert out[tab.signal_box]["visible"] is True
    picker = out[tab.series]
    assert [value for _, value in picker["choices"]] == [
        "reward_margin", "reward_accuracy", "reward_chosen", "reward_rejected"]
    assert ("reward margin (chosen − rejected)", "reward_margin") in picker["choices"]
    assert picker["value"] == ["reward_margin", "reward_accuracy"]  # dpo's headline signals
    first, second, third = (out[p] for p in tab.panels[:3])
    assert first["visible"] and first["label"].startswith("reward margin")
    assert first["value"].dropna().values.tolist() == [[1, 0.5, "raw"], [1, 0.5, "smoothed"]]
    assert second["visible"] and third["visible"] is False
    assert out[tab.panel_rows[0]]["visible"] and not out[tab.panel_rows[1]]["visible"]

    # New lines arrive: panels redraw, the picker (unchanged choices) is left alone.
    runs.append_metrics(run_dir, dpo_record(2))
    runs.append_metrics(run_dir, record(2, 100, eval_loss=0.6, eval_reward_margin=0.7))
    out = dict(zip(tab.view_outputs, tab.tick(session)))
    assert out[tab.series] == SKIP
    frame = out[tab.panels[0]]["value"]
    assert frame[frame.series == "eval"].values.tolist() == [[2, 0.7, "eval"]]

    # The user picks other signals: those are drawn, and later ticks keep the choice.
    rows_and_panels = tab.on_series(session, ["reward_chosen"])
    panels = rows_and_panels[len(tab.panel_rows):]
    assert panels[0]["label"] == "reward of the chosen replies" and not panels[1]["visible"]
    runs.append_metrics(run_dir, dpo_record(3, kl=0.01))
    out = dict(zip(tab.view_outputs, tab.tick(session)))
    assert "kl" in [v for _, v in out[tab.series]["choices"]]   # a new signal is offered
    assert out[tab.series]["value"] == ["reward_chosen"]
    assert out[tab.panels[0]]["label"] == "reward of the chosen replies"


def test_an_sft_run_hides_the_signal_panels(run_dir):
    (run_dir / runs.CONFIG).write_text("stage: sft\n")
    with gr.Blocks():
        tab = train_tab.TrainTab(run_dir.parent)
    session = train_tab.Session()
    runs.append_metrics(run_dir, record(1, loss=2.0, learning_rate=1e-3, tokens_per_s=10.0))
    out = dict(zip(tab.view_outputs, tab.tick(session)))
    assert out[tab.signal_box]["visible"] is False
    assert all(out[p]["visible"] is False for p in tab.panels)


def test_the_watch_adds_only_new_lines_to_its_curves(run_dir, monkeypatch):
    runs.append_metrics(run_dir, dpo_record(1))
    watch = Watch(run_dir)
    watch.poll()
    seen = []
    real_add = watch.curves.add
    monkeypatch.setattr(watch.curves, "add", lambda new: (seen.append(len(new)), real_add(new)))
    runs.append_metrics(run_dir, dpo_record(2))
    runs.append_metrics(run_dir, dpo_record(3))
    watch.poll()
    assert seen == [2]  # the two new lines, not the history
    assert watch.curves.series("reward_margin") == ([1, 2, 3], [0.5, 1.0, 1.5])
    assert watch.signals[:2] == ["reward_margin", "reward_accuracy"] and watch.stage == "?"


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


def test_a_running_export_job_is_the_export_tabs_not_a_run(run_dir, monkeypatch):
    """Seen in the browser: an export job (saves/exports/*, registered as a job) was offered
    to the Train tab's run picker, which refused it with an error toast."""
    from core import jobs, paths
    monkeypatch.setenv("TUNEBENCH_CACHE", str(run_dir.parent.parent / "cache"))
    saves = run_dir.parent
    monkeypatch.setattr(paths, "is_allowed", lambda p: True)
    job = saves / "exports" / "export-gguf-1"
    job.mkdir(parents=True)
    runs.write_status(job, "running", pid=os.getpid(), kind="export")
    jobs.register(job, os.getpid())
    assert runs_view.outside_running(saves) == []
    assert [r.name for r in runs_view.listed_runs(saves)] == ["lora-1"]
    assert runs_view.newest_running(saves) == run_dir
    runs.write_status(run_dir, "completed")
    assert runs_view.newest_running(saves) is None
