"""A GAN on scikit-learn's 8x8 digits, trained with Flax NNX, optax and jbce's GAN losses.

The discriminator minimises ``jbce.discriminator_loss`` (binary cross-entropy on logits: real
→ 1, fake → 0) and the generator the non-saturating ``jbce.generator_loss`` (fake → 1). Both are
small MLPs; pixels are scaled to [0, 1] and the generator ends in a sigmoid. Two standard
stabilisers keep 8000 steps on 1347 images from overfitting or dropping digits: dropout in
the discriminator, and samples drawn from an exponential moving average of the generator's
weights.

Sample quality is measured, not eyeballed: a digits classifier (an MLP trained with
``jbce.softmax_cross_entropy_with_integer_labels`` on the same train split) scores generated
images with an inception-style score ``exp(E_x KL(p(y|x) || p(y)))`` and per-class coverage
(share of samples it assigns to each digit), next to the same score on the held-out real digits.
Goal: generated score >= 0.8 x the real score and every class >= 3% of the samples.

Run ``python examples/gan.py --out runs/gan`` (or ``python -m examples.gan``). Writes
``samples.npy`` (``--samples`` images, shape (n, 8, 8), values in [0, 1]), ``samples.png`` (a
grid, one row per predicted class), ``losses.png`` and ``metrics.json``. ``--mnist DIR`` trains
on MNIST from the four standard IDX files in DIR instead (28x28; give it more ``--steps``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python examples/gan.py`: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import jbce  # noqa: E402
from examples import _data, _models, _plot, _train  # noqa: E402


def classifier_loss(model, batch):
    return jbce.softmax_cross_entropy_with_integer_labels(model(batch["x"]), batch["y"])


def train_classifier(split, *, hidden, steps, seed, progress):
    """An MLP digit classifier; returns a function images -> class probabilities, and metrics."""
    model = _models.MLP([split.x_train.shape[1], hidden, 10], rngs=nnx.Rngs(seed))
    tx = optax.adamw(optax.cosine_decay_schedule(2e-3, steps, alpha=0.05), weight_decay=1e-4)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    state, history = _train.fit(
        _train.supervised_step(graphdef, classifier_loss),
        state,
        {"x": split.x_train, "y": split.y_train},
        steps=steps,
        batch_size=128,
        seed=seed,
        desc="classifier",
        progress=progress,
    )
    model, _ = nnx.merge(graphdef, state)

    def probs(x: np.ndarray) -> np.ndarray:
        return _train.predict(lambda v: jax.nn.softmax(model(v)), x)

    accuracy = float(np.mean(probs(split.x_test).argmax(-1) == split.y_test))
    return probs, {"test_accuracy": accuracy, "loss": history["loss"]}


def inception_score(p: np.ndarray) -> float:
    """exp(E_x KL(p(y|x) || p(y))) with p(y) the mean of p(y|x) over the samples."""
    p = np.clip(p.astype(np.float64), 1e-12, 1.0)
    marginal = p.mean(0, keepdims=True)
    return float(np.exp(np.mean(np.sum(p * (np.log(p) - np.log(marginal)), -1))))


def coverage(p: np.ndarray, classes: int = 10) -> list[float]:
    """Share of samples assigned (argmax) to each class."""
    return (np.bincount(p.argmax(-1), minlength=classes) / len(p)).tolist()


def train_gan(x_train, *, latent, hidden, dropout, ema, steps, batch_size, lr, seed, progress):
    """Trains the GAN; returns the averaged (EMA) generator and the per-step losses."""
    pixels = x_train.shape[1]
    rngs = nnx.Rngs(seed)
    gen = _models.Generator(latent, hidden, pixels, rngs=rngs)
    disc = _models.Discriminator(pixels, hidden, rngs=rngs, dropout=dropout)

    g_opt = nnx.Optimizer(gen, optax.adam(lr, b1=0.5), wrt=nnx.Param)
    d_opt = nnx.Optimizer(disc, optax.adam(lr, b1=0.5), wrt=nnx.Param)
    gen_ema = nnx.clone(gen)
    graphdef, state = nnx.split((gen, disc, g_opt, d_opt, gen_ema))
    step = _train.gan_step(
        graphdef,
        jax.random.key(seed),
        jbce.discriminator_loss,
        jbce.generator_loss,
        ema_decay=ema,
    )
    state, history = _train.fit(
        step,
        state,
        {"x": x_train},
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        desc="GAN",
        progress=progress,
    )
    *_, gen_ema = nnx.merge(graphdef, state)
    return gen_ema, history


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="directory for samples and figures")
    p.add_argument("--steps", type=int, default=8000, help="GAN training steps")
    p.add_argument("--classifier-steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (b1=0.5)")
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256, help="width of every hidden layer")
    p.add_argument("--dropout", type=float, default=0.3, help="discriminator dropout")
    p.add_argument("--ema", type=float, default=0.995, help="generator weight averaging decay")
    p.add_argument("--samples", type=int, default=2000, help="generated images to score and save")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mnist", type=Path, default=None, help="train on MNIST IDX files in DIR")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    progress = not args.no_progress
    if args.mnist is not None:
        data, side, dataset = _data.mnist(args.mnist), 28, f"MNIST ({args.mnist})"
    else:
        data, side, dataset = _data.digits(), 8, "scikit-learn digits"

    probs, clf = train_classifier(
        data, hidden=args.hidden, steps=args.classifier_steps, seed=args.seed, progress=progress
    )
    gen, history = train_gan(
        data.x_train,
        latent=args.latent,
        hidden=args.hidden,
        dropout=args.dropout,
        ema=args.ema,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        progress=progress,
    )
    z = jax.random.normal(jax.random.key(args.seed + 1), (args.samples, args.latent))
    samples = np.clip(_train.predict(gen, np.asarray(z)), 0.0, 1.0)

    p_real, p_fake = probs(data.x_test), probs(samples)
    real_score, fake_score = inception_score(p_real), inception_score(p_fake)
    cover = coverage(p_fake)
    goals = {
        "classifier_accuracy_ge_95pct": clf["test_accuracy"] >= 0.95,
        "score_ge_0.8x_real": fake_score >= 0.8 * real_score,
        "every_class_ge_3pct": min(cover) >= 0.03,
    }
    seconds = time.perf_counter() - start
    metrics = {
        "dataset": dataset,
        "n_train": len(data.x_train),
        "n_test": len(data.x_test),
        "classifier_test_accuracy": clf["test_accuracy"],
        "real_score": real_score,
        "generated_score": fake_score,
        "score_ratio": fake_score / real_score,
        "class_coverage": cover,
        "min_class_coverage": min(cover),
        "goals": goals,
        "history": {
            "d_loss": history["d_loss"].tolist(),
            "g_loss": history["g_loss"].tolist(),
            "classifier_loss": clf["loss"].tolist(),
        },
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "seconds": seconds,
    }

    print(f"\n{dataset}: classifier test accuracy {clf['test_accuracy']:.4f}")
    print(f"  inception-style score  real (held-out, n={len(p_real)}) {real_score:.3f}")
    print(
        f"                         generated (n={len(p_fake)}) {fake_score:.3f}"
        f"  = {fake_score / real_score:.3f} x real"
    )
    print("  class coverage " + " ".join(f"{d}:{c:.1%}" for d, c in enumerate(cover)))
    print(f"  goals met: {all(goals.values())} {goals}  ({seconds:.1f} s)")

    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        images = samples.reshape(-1, side, side).astype(np.float32)
        np.save(args.out / "samples.npy", images)
        labels = p_fake.argmax(-1)
        rows = [images[labels == d][:10] for d in range(10)]
        grid = np.concatenate(
            [np.concatenate([r, np.zeros((10 - len(r), side, side), np.float32)]) for r in rows]
        )
        _plot.image_grid(
            args.out / "samples.png",
            grid,
            title=f"GAN samples, a row per predicted digit (its count of {len(labels)}); "
            f"score {fake_score:.2f}, real {real_score:.2f}",
            row_labels=[f"{d} ({np.sum(labels == d)})" for d in range(10)],
        )
        _plot.loss_curves(
            args.out / "losses.png",
            {"discriminator": history["d_loss"], "generator": history["g_loss"]},
            title="GAN losses (jbce.discriminator_loss / generator_loss)",
            smooth=True,
        )
        (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(f"wrote {args.out}/samples.npy, samples.png, losses.png, metrics.json")
    return metrics


if __name__ == "__main__":
    main()
