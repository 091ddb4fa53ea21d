"""Draw a run's metrics.jsonl to PNG (matplotlib, headless): loss (+ validation), learning
rate, grad norm, throughput and, for MoE models, router load; panels without data are left out."""

from __future__ import annotations

from pathlib import Path

from codefoundry.errors import UserError
from codefoundry.train.metrics import read_metrics

PANELS = [("loss", "loss"), ("lr", "learning rate"), ("grad_norm", "grad norm"), ("tok_per_s", "tokens/s"),
          ("moe_load_max", "router load (max / even)")]


def plot_run(metrics_path: str | Path, out_png: str | Path, panels: list[tuple[str, str]] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics_path = Path(metrics_path)
    if metrics_path.is_dir():
        metrics_path = metrics_path / "metrics.jsonl"
    if not metrics_path.is_file():
        raise UserError(f"{metrics_path} not found; pass a run directory written by `codefoundry pretrain`")
    records = read_metrics(metrics_path)
    panels = [(k, t) for k, t in (panels or PANELS) if any(r.get(k) is not None for r in records)]
    if not panels:
        raise UserError(f"{metrics_path} holds no metrics to plot yet")
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.4 * len(panels)), sharex=True, squeeze=False)
    for ax, (key, title) in zip(axes[:, 0], panels):
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        ax.plot(*zip(*pts), label=key)
        if key == "moe_load_max":
            cv = [(r["step"], r["moe_load_cv"]) for r in records if r.get("moe_load_cv") is not None]
            if cv:
                ax.plot(*zip(*cv), label="moe_load_cv")
            ax.legend()
        if key == "loss":
            val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
            if val:
                ax.plot(*zip(*val), "o-", label="val_loss")
            ax.legend()
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
