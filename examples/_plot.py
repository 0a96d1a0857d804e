"""PNG figures for the examples (matplotlib, non-interactive Agg backend)."""

from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from examples._train import ema  # noqa: E402


def loss_curves(
    path: str | os.PathLike,
    curves: dict[str, np.ndarray],
    *,
    title: str,
    xlabel: str = "step",
    smooth: bool = False,
    log_y: bool = False,
) -> None:
    """One line per named curve; ``smooth`` overlays an exponential moving average."""
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for name, values in curves.items():
        values = np.asarray(values, np.float64)
        steps = np.arange(1, len(values) + 1)
        if smooth:
            (line,) = ax.plot(steps, values, alpha=0.25, linewidth=0.8)
            ax.plot(steps, ema(values), color=line.get_color(), label=f"{name} (EMA)")
        else:
            ax.plot(steps, values, marker="o" if len(values) <= 30 else None, label=name)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def subplots_curves(
    path: str | os.PathLike, panels: dict[str, dict[str, np.ndarray]], *, xlabels: dict[str, str]
) -> None:
    """Several loss-curve panels side by side in one PNG."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), dpi=110)
    for ax, (title, curves) in zip(np.atleast_1d(axes), panels.items()):
        for name, values in curves.items():
            values = np.asarray(values, np.float64)
            ax.plot(
                np.arange(len(values)),
                values,
                marker="o" if len(values) <= 30 else None,
                label=name,
            )
        ax.set_title(title)
        ax.set_xlabel(xlabels.get(title, "step"))
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def image_grid(
    path: str | os.PathLike, images: np.ndarray, *, title: str | None = None, cols: int = 10
) -> None:
    """Images of shape (n, h, w) with values in [0, 1], drawn as a grid (white = 0)."""
    images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
    n, h, w = images.shape
    rows = math.ceil(n / cols)
    canvas = np.ones((rows * (h + 1) + 1, cols * (w + 1) + 1), np.float32) * 0.5
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = img
    fig, ax = plt.subplots(figsize=(cols * 0.6, rows * 0.6 + (0.4 if title else 0)), dpi=110)
    ax.imshow(canvas, cmap="gray_r", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def train_val_panels(
    path: str | os.PathLike,
    panels: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]],
    *,
    ylabels: dict[str, str] | None = None,
    smooth: tuple[str, ...] = (),
    decay: float = 0.9,
) -> None:
    """Loss panels side by side whose curves each carry their own steps: ``{title: {name:
    (steps, values)}}``. A name in ``smooth`` is drawn faintly with its moving average
    (``decay``; 0.9 follows a few-hundred-step curve without lagging) on top; the others with
    markers (evaluations every few dozen steps), or as a dashed line for a single value."""
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.6), dpi=110)
    for ax, (title, curves) in zip(np.atleast_1d(axes), panels.items()):
        for name, (steps, values) in curves.items():
            steps, values = np.asarray(steps), np.asarray(values, np.float64)
            if name in smooth:
                (line,) = ax.plot(steps, values, alpha=0.25, linewidth=0.8)
                smoothed = ema(values, decay)
                ax.plot(steps, smoothed, color=line.get_color(), label=f"{name} (EMA)")
            elif len(values) == 1:
                ax.axhline(values[0], linestyle="--", color="gray", label=name)
            else:
                ax.plot(steps, values, marker="o", label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel((ylabels or {}).get(title, "loss"))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
