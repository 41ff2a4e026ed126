"""PNG plots of a sensitivity result: loss against ratio per group, and the estimated budget/loss frontier.

matplotlib is an optional extra (``onnxprune[plots]``): imported only here, with a clear error when missing."""

from __future__ import annotations

import os
from pathlib import Path

from onnxprune.errors import ConfigError, OutputError
from onnxprune.search.report import METRICS, frontier
from onnxprune.search.sensitivity import SensitivityResult

PLOTS_HINT = "pip install 'onnxprune[plots]' (or pip install matplotlib)"
FILES = ("sensitivity_loss.png", "sensitivity_frontier.png")


def check_plot_target(folder: str | Path) -> Path:
    """Refuse an unusable ``--plot`` folder and a missing matplotlib before the (long) run. A missing folder is
    created (its parent must exist)."""
    _pyplot()
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise OutputError(f"--plot {path}: exists and is not a folder")
    if not path.exists() and not path.parent.is_dir():
        raise OutputError(f"--plot {path}: folder {path.parent} does not exist")
    if not os.access(path if path.exists() else path.parent, os.W_OK | os.X_OK):
        raise OutputError(f"--plot {path}: not writable")
    return path


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError(f"--plot needs matplotlib: {PLOTS_HINT}") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def write_plots(result: SensitivityResult, folder: str | Path) -> list[Path]:
    """Write the two PNGs into ``folder``; returns their paths."""
    plt = _pyplot()
    folder = check_plot_target(folder)
    folder.mkdir(exist_ok=True)
    recoveries = result.options["recover"]
    judged = bool(result.rows) and result.rows[0].judged is not None
    metric = METRICS[(result.rows[0].judged if judged else result.rows[0].selection).metric] if result.rows else ""
    where = "--data" if judged else "--calib"
    paths = [folder / name for name in FILES]
    try:
        fig, axes = plt.subplots(1, len(recoveries), figsize=(5 * len(recoveries), 4), sharey=True, squeeze=False)
        for ax, method in zip(axes[0], recoveries):
            for g in result.groups:
                rows = sorted((r for r in result.rows if r.group == g.id and r.recover == method),
                              key=lambda r: r.ratio)
                ax.plot([r.ratio for r in rows], [100 * (r.judged if judged else r.selection).loss for r in rows],
                        marker="o", label=g.name if g.macs_share is None else f"{g.name} ({100 * g.macs_share:.0f}% MACs)")
            ax.set_title(f"recovery: {method}")
            ax.set_xlabel("ratio of the group's channels removed")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(f"{metric} on {where} (%)")
        axes[0][-1].legend(fontsize=6, loc="upper left")
        fig.tight_layout()
        fig.savefig(paths[0], dpi=80)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(5, 4))
        for method in recoveries:
            points = frontier(result, method, judged)
            ax.plot([1.0] + [p.macs_kept for p in points], [0.0] + [100 * p.loss for p in points], marker=".",
                    label=f"recovery {method}")
        ax.set_xlabel("MACs kept (the budget search's allocation)")
        ax.set_ylabel(f"{metric} on {where}, summed over groups (%)")
        ax.set_title("budget/loss frontier (single-group losses added)", fontsize=9)
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(paths[1], dpi=80)
        plt.close(fig)
    except OSError as exc:
        raise OutputError(f"--plot {folder}: cannot write the plots ({exc.strerror or exc})") from None
    return paths
