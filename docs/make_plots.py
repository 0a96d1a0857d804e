"""Make the plots of the Numerics page from the library: loss and gradient against the logit.

Run from the repository root after changing a loss (the PNGs are committed)::

    python docs/make_plots.py            # writes docs/_static/numerics_*.png

Every curve is computed in float32, by jbce and by the textbook formula written naively
(``-y log(sigmoid(x))``, ``-log(softmax(x))[target]``, differentiated by autodiff), and
compared with the exact value computed in float64 with numpy.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

import jbce

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
NAIVE = dict(color="tab:red", lw=1.6, ls="--", label="naive (float32)")
JBCE = dict(color="tab:blue", lw=2.4, alpha=0.8, label="jbce (float32)")
EXACT = dict(color="black", lw=0.9, ls=":", label="exact (float64)")


def rel_err(v, exact):
    v = np.asarray(v, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        e = np.abs(v - exact) / np.abs(exact)
    e = np.where(np.isfinite(e), e, 1.0)  # NaN / inf results plotted as 100% error
    return np.clip(e, 1e-9, 1.0)


def abs_err(v, exact):
    v = np.asarray(v, np.float64)
    e = np.abs(v - exact)
    e = np.where(np.isfinite(e), e, 1e2)  # NaN / inf results plotted at the top
    return np.clip(e, 1e-10, 1e2)


def panels(fig_title, x, curves, xlabel, path, *, relative=True):
    """curves: dict name -> (loss, grad, style); 'exact' holds the float64 pair.

    Where the naive float32 loss or gradient is inf or NaN, the x range is shaded red.
    """
    ex_loss, ex_grad = curves.pop("exact")
    naive_loss, naive_grad, _ = curves["naive"]
    bad = ~(np.isfinite(np.asarray(naive_loss)) & np.isfinite(np.asarray(naive_grad)))
    # One panel per row: at the docs' page width each stays as wide as the text, legends
    # readable (three side by side shrank to a third of that).
    fig, axes = plt.subplots(3, 1, figsize=(7.5, 10), constrained_layout=True)
    for ax in axes:
        if bad.any():
            ax.fill_between(x, 0, 1, where=bad, color="tab:red", alpha=0.12, lw=0,
                            transform=ax.get_xaxis_transform(),
                            label="naive: loss inf or gradient NaN")  # fmt: skip
    ax = axes[0]
    for loss, _, style in curves.values():
        ax.semilogy(x, np.where(np.asarray(loss) > 0, loss, np.nan), **style)
    ax.semilogy(x, ex_loss, **EXACT)
    ax.set(title="loss (log scale; gaps: 0, inf or NaN)", xlabel=xlabel, ylim=(1e-18, 1e3))
    ax = axes[1]
    for _, grad, style in curves.values():
        ax.plot(x, grad, **style)
    ax.plot(x, ex_grad, **EXACT)
    ax.set(title="gradient d loss / d x (NaN not drawn)", xlabel=xlabel)
    ax = axes[2]
    if relative:
        for loss, _, style in curves.values():
            ax.semilogy(x, rel_err(loss, ex_loss), **style)
        ax.axhline(np.finfo(np.float32).eps, color="gray", lw=0.8)
        ax.text(x[0], np.finfo(np.float32).eps * 1.6, "float32 eps", color="gray", fontsize=8)
        ax.set(title="relative error of the loss (top: 0, inf or NaN)", xlabel=xlabel,
               ylim=(1e-9, 2.0))  # fmt: skip
    else:
        for loss, _, style in curves.values():
            ax.semilogy(x, abs_err(loss, ex_loss), **style)
        ulp = np.spacing(np.abs(x).astype(np.float32)).astype(np.float64)
        ax.semilogy(x, ulp, color="gray", lw=0.8, label="one float32 ulp of the logit")
        ax.legend(loc="upper right", fontsize=9)
        ax.set(title="absolute error of the loss (top: inf or NaN)", xlabel=xlabel,
               ylim=(1e-10, 2e2))  # fmt: skip
    axes[0].legend(loc="best", fontsize=9)
    fig.suptitle(fig_title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def binary(path):
    x = np.linspace(-120.0, 40.0, 1601, dtype=np.float32)
    xs = jnp.asarray(x)
    y = jnp.ones_like(xs)

    def naive(x, y):
        return -y * jnp.log(jax.nn.sigmoid(x))

    def ours(x, y):
        return jbce.sigmoid_binary_cross_entropy(x, y, reduction="none")

    def grad(f):
        return jax.vmap(jax.grad(lambda x, y: f(x, y).sum()))(xs, y)

    x64 = x.astype(np.float64)
    exact = (np.logaddexp(0.0, -x64), -1.0 / (1.0 + np.exp(x64)))  # softplus(-x), sigmoid(x) - 1
    panels(
        "Binary cross-entropy with label y = 1, against the logit x",
        x,
        {
            "naive": (naive(xs, y), grad(naive), {**NAIVE, "label": "-y log(sigmoid(x)), float32"}),
            "jbce": (
                ours(xs, y),
                grad(ours),
                {**JBCE, "label": "jbce.sigmoid_binary_cross_entropy"},
            ),
            "exact": exact,
        },
        "logit x",
        path,
    )


def softmax(path, k=10):
    t = np.linspace(-120.0, 120.0, 2401, dtype=np.float32)
    logits = jnp.zeros((t.size, k), jnp.float32).at[:, 0].set(jnp.asarray(t))
    labels = jnp.zeros((t.size,), jnp.int32)

    def naive(x, y):
        return -jnp.take_along_axis(jnp.log(jax.nn.softmax(x)), y[:, None], -1)[:, 0]

    def ours(x, y):
        return jbce.softmax_cross_entropy_with_integer_labels(x, y, reduction="none")

    def grad(f):  # d loss / d target logit
        return jax.grad(lambda x: f(x, labels).sum())(logits)[:, 0]

    t64 = t.astype(np.float64)
    r = (k - 1.0) * np.exp(-t64)  # the other classes' share, relative to the target's
    exact = (np.log1p(r), -r / (1.0 + r))
    panels(
        f"Softmax cross-entropy over {k} classes, target logit t, the other {k - 1} logits 0",
        t,
        {
            "naive": (
                naive(logits, labels),
                grad(naive),
                {**NAIVE, "label": "-log(softmax(x))[target], float32"},
            ),  # fmt: skip
            "jbce": (
                ours(logits, labels),
                grad(ours),
                {**JBCE, "label": "jbce.softmax_cross_entropy_with_integer_labels"},
            ),  # fmt: skip
            "exact": exact,
        },
        "target logit t",
        path,
        relative=False,  # lse - t: both round a loss below an ulp of t to 0
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=HERE / "_static")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    binary(args.out / "numerics_binary.png")
    softmax(args.out / "numerics_softmax.png")


if __name__ == "__main__":
    main()
