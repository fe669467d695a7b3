"""loss.png: the final curve of a run, drawn from metrics.jsonl with matplotlib."""

from __future__ import annotations

from pathlib import Path

from . import runs


def loss_series(records: list[dict]) -> tuple[list[int], list[float], list[int], list[float]]:
    """(steps, losses, eval steps, eval losses), keeping the latest line for a step
    (a resumed run re-logs the steps after its checkpoint)."""
    train, evals = {}, {}
    for r in records:
        if isinstance(r.get("loss"), (int, float)):
            train[r["step"]] = r["loss"]
        if isinstance(r.get("eval_loss"), (int, float)):
            evals[r["step"]] = r["eval_loss"]
    ts, es = sorted(train), sorted(evals)
    return ts, [train[s] for s in ts], es, [evals[s] for s in es]


def plot_loss(run_dir: Path, weight: float = 0.9) -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses, eval_steps, eval_losses = loss_series(runs.read_metrics(run_dir))
    if not steps:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, losses, color="#93c5fd", linewidth=1, label="loss")
    ax.plot(steps, runs.smooth(losses, weight), color="#1d4ed8", linewidth=2,
            label=f"smoothed ({weight})")
    if eval_steps:
        ax.plot(eval_steps, eval_losses, "o-", color="#ea580c", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(run_dir) / "loss.png"
    fig.savefig(out)
    plt.close(fig)
    return out
