"""Training logs a person can read without tensorboard: a CSV of every logged step and a loss PNG."""

from __future__ import annotations

import csv
from pathlib import Path

from transformers import TrainerCallback

FIELDS = ("step", "epoch", "loss", "learning_rate", "grad_norm")


class CsvLogger(TrainerCallback):
    """Appends one row per logging step; a resumed run continues the same file."""

    def __init__(self, path: Path, extra: tuple[str, ...] = ()):
        self.path = Path(path)
        self.extra = extra  # more logged values, as columns (preference runs: reward margins)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        new = not self.path.exists()
        with open(self.path, "a", newline="") as fh:
            w = csv.writer(fh)
            if new:
                w.writerow(FIELDS + self.extra)
            w.writerow([state.global_step, logs.get("epoch", ""), logs["loss"], logs.get("learning_rate", ""), logs.get("grad_norm", ""),
                        *(logs.get(k, "") for k in self.extra)])


def read_losses(path: Path) -> list[tuple[int, float]]:
    """(step, loss) rows; a resumed run's repeated steps keep the last value."""
    if not Path(path).is_file():
        return []
    rows: dict[int, float] = {}
    with open(path) as fh:
        for r in csv.DictReader(fh):
            rows[int(r["step"])] = float(r["loss"])
    return sorted(rows.items())


def plot_loss(csv_path: Path, png_path: Path, title: str) -> bool:
    rows = read_losses(csv_path)
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([s for s, _ in rows], [l for _, l in rows], marker="." if len(rows) < 50 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return True
