"""The curves of a run: which metrics are drawn, under which names, and loss.png.

metrics.jsonl lines carry the loss and, for the preference and RL stages, each stage's
own signals (reward margin, accuracy, mean reward, ...); evaluation lines carry the same
names prefixed with `eval_`. This module is the one table of those signals and their
human labels, so the page's live charts and loss.png name them alike.
"""

from __future__ import annotations

import math
from pathlib import Path

from . import i18n, runs
from .i18n import t

# The signals a trainer may log besides the loss, in the order they are offered. What a
# person reads for each is in the catalogues (core/locales): plot.signal.<name>, a short
# name for an axis, and plot.signal.<name>.why where it needs explaining. `reward_<func>`
# (one per grpo reward function) is labelled by `signal_label`. Evaluation lines carry the
# same names with EVAL_PREFIX.
SIGNALS = ("reward_margin", "reward_accuracy", "accuracy", "reward_chosen", "reward_rejected",
           "reward", "reward_std", "completion_length", "kl")
REWARD_PREFIX = "reward_"   # reward_<func>: one grpo reward function's mean score
EVAL_PREFIX = "eval_"
# What each stage shows unless the user picks otherwise: the signals that say whether
# training works (sft and pt have the loss alone).
HEADLINE = {
    "dpo": ("reward_margin", "reward_accuracy"),
    "kto": ("reward_margin",),
    "rm": ("accuracy",),
    "grpo": ("reward", "completion_length"),
}
# Bookkeeping on every line: never a curve.
_NOT_CURVES = frozenset({"step", "total_steps", "epoch", "elapsed_s", "eta_s"})
MAX_PNG_SIGNALS = 4   # signal panels under the loss in loss.png


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Curves:
    """Every metric of a run as {step: value}, built incrementally from metrics records.

    `add` takes only the new lines (a watcher feeds what `runs.MetricsTail.poll` returned),
    so a live view never rescans its history. The latest line for a step wins: a resumed
    run re-logs the steps after its checkpoint.
    """

    def __init__(self, records: list[dict] = ()):
        self._by_key: dict[str, dict[int, float]] = {}
        self.add(records)

    def add(self, records: list[dict]) -> None:
        for record in records:
            step = record.get("step")
            if not _number(step):
                continue
            for key, value in record.items():
                if key not in _NOT_CURVES and _number(value):
                    self._by_key.setdefault(key, {})[step] = value

    def keys(self) -> list[str]:
        return list(self._by_key)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric, by step ([], [] when it was never logged)."""
        points = self._by_key.get(key) or {}
        steps = sorted(points)  # nearly sorted already: linear time
        return steps, [points[s] for s in steps]


def loss_series(records: list[dict] | Curves) -> tuple[list[int], list[float], list[int],
                                                       list[float]]:
    """(steps, losses, eval steps, eval losses), keeping the latest line for a step
    (a resumed run re-logs the steps after its checkpoint)."""
    curves = records if isinstance(records, Curves) else Curves(records)
    return (*curves.series("loss"), *curves.series("eval_loss"))


# --- the stages' own signals ------------------------------------------------------------

def is_signal(name: str) -> bool:
    """A training signal drawn besides the loss (evaluation names count as theirs)."""
    name = name.removeprefix(EVAL_PREFIX)
    return name in SIGNALS or (name.startswith(REWARD_PREFIX) and len(name) > len(REWARD_PREFIX))


def signal_label(name: str, lang: str | None = None) -> str:
    """What a person reads for a signal: 'reward margin (chosen − rejected)',
    'reward: exact_match (mean score of this reward function)', 'eval reward margin
    (chosen − rejected)'."""
    short, why = _signal_texts(name, lang)
    return t("plot.explained", lang, label=short, why=why) if why else short


def signal_short(name: str, lang: str | None = None) -> str:
    """The label without its explanation, for an axis: 'reward margin'."""
    return _signal_texts(name, lang)[0]


def _signal_texts(name: str, lang: str | None) -> tuple[str, str | None]:
    if name.startswith(EVAL_PREFIX):
        short, why = _signal_texts(name[len(EVAL_PREFIX):], lang)
        return t("plot.eval", lang, label=short), why
    if name in SIGNALS:
        why = f"plot.signal.{name}.why"
        return t(f"plot.signal.{name}", lang), (t(why, lang) if i18n.has(why) else None)
    if name.startswith(REWARD_PREFIX):
        return (t("plot.reward_function", lang, name=name[len(REWARD_PREFIX):]),
                t("plot.reward_function.why", lang))
    return name.replace("_", " "), None


def signal_names(keys) -> list[str]:
    """The signals among metric names, eval ones folded into theirs: the known signals in
    SIGNALS order, then each reward function's, alphabetically."""
    present = {k.removeprefix(EVAL_PREFIX) for k in keys if is_signal(k)}
    known = [name for name in SIGNALS if name in present]
    return known + sorted(present - set(known))


def headline(stage: str | None, present: list[str]) -> list[str]:
    """The signals a stage shows by default, among those present."""
    return [name for name in HEADLINE.get(stage or "", ()) if name in present]


def signal_series(curves: Curves, name: str) -> tuple[list[int], list[float], list[int],
                                                       list[float]]:
    """(steps, values, eval steps, eval values) of one signal."""
    return (*curves.series(name), *curves.series(EVAL_PREFIX + name))


def finite(xs: list, ys: list) -> tuple[list, list]:
    """The points whose value is a finite number (a NaN loss is a gap, not a point)."""
    kept = [(x, y) for x, y in zip(xs, ys) if math.isfinite(y)]
    return [x for x, _ in kept], [y for _, y in kept]


# --- loss.png ------------------------------------------------------------------------

def run_stage(run_dir: Path) -> str | None:
    """The stage in a run's config.yaml (None when it cannot be read)."""
    from .errors import BadInput
    from .schema import read_yaml
    try:
        stage = read_yaml(Path(run_dir) / runs.CONFIG).get("stage")
    except (BadInput, OSError):  # a missing or odd config only loses the stage's panels
        return None
    return stage if isinstance(stage, str) else None


def png_signals(curves: Curves, stage: str | None) -> list[str]:
    """The signal panels loss.png draws: the stage's headline ones, else the first few."""
    present = signal_names(curves.keys())
    return headline(stage, present) or present[:MAX_PNG_SIGNALS]


def _draw(ax, steps, values, eval_steps, eval_values, weight: float, name: str) -> None:
    steps, values = finite(steps, values)
    ax.plot(steps, values, color="#93c5fd", linewidth=1, label=name)
    ax.plot(steps, runs.smooth(values, weight), color="#1d4ed8", linewidth=2,
            label=f"smoothed ({weight})")
    eval_steps, eval_values = finite(eval_steps, eval_values)
    if eval_steps:
        ax.plot(eval_steps, eval_values, "o-", color="#ea580c", label=f"eval {name}")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)


def plot_loss(run_dir: Path, weight: float = 0.9, stage: str | None = None) -> Path | None:
    """Draw loss.png: the raw, smoothed and eval loss, and under it one panel per signal
    of the run's stage (read from its config.yaml unless given)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = Curves(runs.read_metrics(run_dir))
    steps, losses, eval_steps, eval_losses = loss_series(curves)
    signals = png_signals(curves, stage or run_stage(run_dir))
    if not steps and not signals:
        return None
    cols = max(1, len(signals))
    fig = plt.figure(figsize=(7 if cols < 3 else 3 * cols, 6.8 if signals else 4), dpi=110)
    grid = fig.add_gridspec(2 if signals else 1, cols, height_ratios=[3, 2] if signals else None)
    ax = fig.add_subplot(grid[0, :])
    _draw(ax, steps, losses, eval_steps, eval_losses, weight, "loss")
    ax.set_ylabel("loss")
    ax.set_title(Path(run_dir).name)
    ax.legend()
    for i, name in enumerate(signals):
        panel = fig.add_subplot(grid[1, i])
        # loss.png is a file, read anywhere: English (its font has no CJK glyphs either)
        _draw(panel, *signal_series(curves, name), weight, signal_short(name, "en"))
        panel.set_title(signal_label(name, "en"), fontsize=8, wrap=True)
        panel.tick_params(labelsize=7)
    fig.tight_layout()
    out = Path(run_dir) / "loss.png"
    fig.savefig(out)
    plt.close(fig)
    return out
