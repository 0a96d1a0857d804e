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
    path: str | os.PathLike,
    panels: dict[str, dict[str, np.ndarray]],
    *,
    xlabels: dict[str, str],
    hlines: dict[str, dict[str, float]] | None = None,
    log_y: bool | tuple[str, ...] = False,
    log_x: tuple[str, ...] = (),
    ylabels: dict[str, str] | None = None,
) -> None:
    """Loss-curve panels stacked one per row in one PNG (each readable at page width).

    ``hlines`` draws named reference values (such as scikit-learn's optimum) as dashed lines
    on the panel of that title; ``log_y`` puts every panel (or, given a tuple of titles,
    those) on a log axis, where convergence to a reference line stays visible instead of
    flattening into it. The panels named in ``log_x`` get a log step axis too (symmetric-log,
    so step 0 is kept). NaN values are not drawn.
    """
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 3.0 * len(panels)), dpi=110)
    for ax, (title, curves) in zip(np.atleast_1d(axes), panels.items()):
        for i, (name, values) in enumerate(curves.items()):
            values = np.asarray(values, np.float64)
            gaps = bool(np.isnan(values).any())  # points, where a line would break into bits
            ax.plot(
                np.arange(len(values)),
                values,
                marker="o" if len(values) <= 30 else ("." if gaps else None),
                markersize=6 if i == 0 else 3,  # a later curve that coincides stays visible
                linestyle="none" if gaps and len(values) > 30 else ("-" if i == 0 else "--"),
                label=name,
            )
        for name, value in (hlines or {}).get(title, {}).items():
            ax.axhline(value, linestyle="--", color="black", linewidth=1, label=name)
        if log_y is True or (isinstance(log_y, tuple) and title in log_y):
            ax.set_yscale("log")
        if title in log_x:
            ax.set_xscale("symlog", linthresh=1)
            ax.set_xlim(left=0)
        ax.set_title(title)
        ax.set_xlabel(xlabels.get(title, "step"))
        ax.set_ylabel((ylabels or {}).get(title, "loss"))
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def image_grid(
    path: str | os.PathLike,
    images: np.ndarray,
    *,
    title: str | None = None,
    cols: int = 10,
    row_labels: list[str] | None = None,
) -> None:
    """Images of shape (n, h, w) with values in [0, 1], drawn as a grid (white = 0); each
    row of ``cols`` images gets its entry of ``row_labels`` at its left."""
    images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
    n, h, w = images.shape
    rows = math.ceil(n / cols)
    canvas = np.ones((rows * (h + 1) + 1, cols * (w + 1) + 1), np.float32) * 0.5
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = img
    label_width = 0.9 if row_labels else 0.0
    fig, ax = plt.subplots(
        figsize=(cols * 0.6 + label_width, rows * 0.6 + (0.4 if title else 0)), dpi=110
    )
    ax.imshow(canvas, cmap="gray_r", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if row_labels:
        ax.set_yticks([1 + r * (h + 1) + (h - 1) / 2 for r in range(len(row_labels))])
        ax.set_yticklabels(row_labels, fontsize=9)
        ax.tick_params(axis="y", length=0)
    else:
        ax.set_yticks([])
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
    """Loss panels, one per row, whose curves each carry their own steps: ``{title: {name:
    (steps, values)}}``. A name in ``smooth`` is drawn faintly with its moving average
    (``decay``; 0.9 follows a few-hundred-step curve without lagging) on top; the others with
    markers (evaluations every few dozen steps), or as a dashed line for a single value."""
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 3.4 * len(panels)), dpi=110)
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
