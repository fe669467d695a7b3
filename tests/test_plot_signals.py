"""The stages' own signals: which metrics they are, what they are called, how they are
drawn live (raw and smoothed, like the loss) and in loss.png."""

from __future__ import annotations

import json
import math

import pytest

from core import plot, runs
from webui import runs_view


def line(step: int, **values) -> dict:
    return {"step": step, "total_steps": 20, "epoch": step / 10, "elapsed_s": step * 1.5,
            "eta_s": 3.0, **values}


def dpo_lines(steps: int = 20) -> list[dict]:
    out = []
    for s in range(1, steps + 1):
        out.append(line(s, loss=0.69 * 0.9 ** s, learning_rate=1e-3, tokens_per_s=100.0,
                        reward_chosen=0.2 * s, reward_rejected=-0.3 * s,
                        reward_margin=0.5 * s, reward_accuracy=min(1.0, s / 10)))
        if s % 10 == 0:
            out.append(line(s, eval_loss=0.5, eval_reward_margin=0.4 * s,
                            eval_reward_accuracy=0.9))
    return out


def test_signals_are_found_and_labelled_in_one_table():
    curves = plot.Curves(dpo_lines())
    assert plot.signal_names(curves.keys()) == [
        "reward_margin", "reward_accuracy", "reward_chosen", "reward_rejected"]
    grpo = plot.Curves([line(1, loss=0.1, reward=0.5, reward_std=0.2, kl=0.01,
                             completion_length=12.0, reward_exact_match=1.0,
                             reward_format=0.0, grad_norm=3.0)])
    names = plot.signal_names(grpo.keys())
    assert names == ["reward", "reward_std", "completion_length", "kl", "reward_exact_match",
                     "reward_format"]
    assert "grad_norm" not in names and "learning_rate" not in names
    assert plot.signal_label("reward_margin") == "reward margin (chosen − rejected)"
    assert plot.signal_label("eval_reward_margin") == "eval reward margin (chosen − rejected)"
    assert plot.signal_label("reward_exact_match").startswith("reward: exact_match")
    assert plot.signal_short("reward_margin") == "reward margin"
    assert plot.is_signal("eval_accuracy") and not plot.is_signal("eval_loss")


@pytest.mark.parametrize("stage, present, expected", [
    ("dpo", ["reward_margin", "reward_accuracy", "reward_chosen"],
     ["reward_margin", "reward_accuracy"]),
    ("kto", ["reward_margin", "kl"], ["reward_margin"]),
    ("rm", ["accuracy", "reward_margin"], ["accuracy"]),
    ("grpo", ["reward", "reward_std", "completion_length"], ["reward", "completion_length"]),
    ("sft", ["reward_margin"], []),
    ("pt", [], []),
    ("dpo", [], []),  # nothing logged yet: nothing drawn
])
def test_each_stage_shows_its_headline_signals_by_default(stage, present, expected):
    assert plot.headline(stage, present) == expected
    assert runs_view.series_to_show(None, stage, present) == expected
    assert runs_view.series_to_show(["kl", "gone"], stage, present + ["kl"]) == ["kl"]


def test_series_keep_the_latest_line_for_a_step_and_eval_points_apart():
    records = dpo_lines(12)
    # A resumed run re-logs the steps after its checkpoint at step 10.
    records += [line(11, reward_margin=-1.0), line(12, reward_margin=-2.0)]
    curves = plot.Curves(records)
    steps, values, eval_steps, eval_values = plot.signal_series(curves, "reward_margin")
    assert steps == list(range(1, 13)) and values[-2:] == [-1.0, -2.0]
    assert (eval_steps, eval_values) == ([10], [4.0])
    assert plot.loss_series(records)[2:] == ([10], [0.5])
    # Built line by line, the curves are the same as built at once.
    incremental = plot.Curves()
    for r in records:
        incremental.add([r])
    assert incremental.series("reward_margin") == curves.series("reward_margin")
    assert "step" not in curves.keys() and "eta_s" not in curves.keys()


def test_signal_frames_are_raw_smoothed_and_eval_like_the_loss():
    curves = plot.Curves(dpo_lines() + [line(21, reward_margin=float("nan"))])
    frame = runs_view.signal_frame(curves, "reward_margin", 0.6)
    raw = frame[frame.series == "raw"].value.tolist()
    assert raw == [0.5 * s for s in range(1, 21)]  # the NaN is a gap, not a point
    smoothed = frame[frame.series == "smoothed"].value.tolist()
    assert smoothed == pytest.approx(runs.smooth(raw, 0.6))
    assert frame[frame.series == "eval"].values.tolist() == [[10, 4.0, "eval"],
                                                             [20, 8.0, "eval"]]
    unsmoothed = runs_view.signal_frame(curves, "reward_margin", 0.0)
    assert unsmoothed[unsmoothed.series == "smoothed"].value.tolist() == raw
    assert set(runs_view.SIGNAL_COLORS) == set(frame.series)
    # The smoothed history never shifts as points arrive.
    more = plot.Curves(dpo_lines() + [line(21, reward_margin=100.0)])
    later = runs_view.signal_frame(more, "reward_margin", 0.6)
    assert later[later.series == "smoothed"].value.tolist()[:20] == pytest.approx(smoothed)


def write_run(run_dir, records, stage: str | None) -> None:
    run_dir.mkdir(parents=True)
    if stage:
        (run_dir / runs.CONFIG).write_text(f"stage: {stage}\n")
    with open(run_dir / runs.METRICS, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)


def test_loss_png_draws_the_stage_signals_in_a_panel_of_their_own(tmp_path):
    import matplotlib.image as mpimg

    dpo, sft = tmp_path / "dpo-run", tmp_path / "sft-run"
    write_run(dpo, dpo_lines(), "dpo")
    write_run(sft, [line(s, loss=2.0 / s) for s in range(1, 21)], "sft")
    assert plot.png_signals(plot.Curves(dpo_lines()), "dpo") == ["reward_margin",
                                                                "reward_accuracy"]
    out = plot.plot_loss(dpo)
    assert out == dpo / "loss.png" and out.stat().st_size > 10_000
    tall = mpimg.imread(out).shape
    short = mpimg.imread(plot.plot_loss(sft)).shape
    assert tall[0] > short[0] * 1.4  # a second row of panels under the loss
    # Without a config, the signals found are drawn all the same.
    bare = tmp_path / "bare"
    write_run(bare, dpo_lines(), None)
    assert plot.png_signals(plot.Curves(dpo_lines()), None)[:2] == ["reward_margin",
                                                                   "reward_accuracy"]
    assert plot.plot_loss(bare).is_file()
    empty = tmp_path / "empty"
    write_run(empty, [], "dpo")
    assert plot.plot_loss(empty) is None


def test_png_shows_the_panels_a_signal_only_run_has(tmp_path):
    """An rm run whose trainer logs accuracy only at evaluation still gets its panel."""
    run = tmp_path / "rm-run"
    write_run(run, [line(1, loss=0.7), line(1, eval_accuracy=0.75, eval_reward_margin=0.3)],
              "rm")
    curves = plot.Curves(runs.read_metrics(run))
    assert plot.png_signals(curves, "rm") == ["accuracy"]
    assert math.isclose(plot.signal_series(curves, "accuracy")[3][0], 0.75)
    assert plot.plot_loss(run).is_file()
