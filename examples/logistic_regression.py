"""Logistic regression with jbce: optax and Newton's method, next to scikit-learn.

Part 1, binary: scikit-learn's breast-cancer data (stratified 75/25 split, ``random_state=0``,
``StandardScaler`` fitted on the train part). A Flax NNX logistic-regression model is fitted

* with optax (full-batch Adam) on ``jbce.sigmoid_binary_cross_entropy``, and
* by Newton's method, whose Hessian is reverse-over-reverse through jbce's hand-written
  gradient (``jax.jacrev(jax.grad(loss))``),

and both are compared with scikit-learn's ``LogisticRegression()``. For a fair comparison all
three minimise the same objective: scikit-learn's default is an L2 penalty with ``C=1.0`` on the
weights (not the intercept), ``0.5 * ||w||^2 + C * sum_i logloss_i``; dividing by ``C * n`` gives
``mean_i logloss_i + 0.5 * l2 * ||w||^2`` with ``l2 = 1 / (C * n)``, which the jbce fits use.

Part 2, multinomial: scikit-learn's 8x8 digits with
``jbce.softmax_cross_entropy_with_integer_labels`` (minibatch Adam, same ``l2 = 1 / n``
convention), test accuracy printed next to scikit-learn's.

Run ``python examples/logistic_regression.py --out runs/logistic_regression``. Writes
``metrics.json``, ``test_probs.npy`` (Newton fit's P(y=1) on the breast-cancer test split, in
split order) and ``loss_curve.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

if __package__ in (
    None,
    "",
):  # `python examples/logistic_regression.py`: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import jbce  # noqa: E402
from examples import _data, _models, _plot, _train  # noqa: E402


def l2_penalty(model: nnx.Module, l2: float) -> jax.Array:
    """0.5 * l2 * ||kernel||^2 (the intercept is not penalised, as in scikit-learn)."""
    return 0.5 * l2 * jnp.sum(model.dense.kernel[...] ** 2)


def binary_loss(l2: float):
    def loss_fn(model, batch):
        logits = model(batch["x"])
        return jbce.sigmoid_binary_cross_entropy(logits, batch["y"]) + l2_penalty(model, l2)

    return loss_fn


def multiclass_loss(l2: float):
    def loss_fn(model, batch):
        logits = model(batch["x"])
        loss = jbce.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        return loss + l2_penalty(model, l2)

    return loss_fn


def scores(y: np.ndarray, p1: np.ndarray) -> dict[str, float]:
    """Accuracy and log loss of P(y=1) predictions (scikit-learn's ``log_loss``)."""
    from sklearn.metrics import log_loss

    return {
        "accuracy": float(np.mean((p1 > 0.5) == (y == 1))),
        "log_loss": float(log_loss(y, np.clip(p1, 1e-7, 1 - 1e-7), labels=[0, 1])),
    }


def fit_optax(split, *, l2, steps, lr, seed, progress, classes=1, batch_size=None):
    model = _models.Linear(split.x_train.shape[1], classes, rngs=nnx.Rngs(seed))
    schedule = optax.cosine_decay_schedule(lr, steps, alpha=0.01)
    optimizer = nnx.Optimizer(model, optax.adam(schedule), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    loss_fn = binary_loss(l2) if classes == 1 else multiclass_loss(l2)
    y = split.y_train.astype(np.float32) if classes == 1 else split.y_train
    state, history = _train.fit(
        _train.supervised_step(graphdef, loss_fn),
        state,
        {"x": split.x_train, "y": y},
        steps=steps,
        batch_size=batch_size or len(y),
        seed=seed,
        desc="optax (digits)" if classes > 1 else "optax (breast cancer)",
        progress=progress,
    )
    model, _ = nnx.merge(graphdef, state)
    return model, history["loss"]


def fit_newton(split, *, l2, steps, seed):
    model = _models.Linear(split.x_train.shape[1], 1, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    step = jax.jit(_train.newton_step(graphdef, binary_loss(l2)))
    batch = {"x": jnp.asarray(split.x_train), "y": jnp.asarray(split.y_train, jnp.float32)}
    losses, grad_norms = [], []
    for _ in range(steps):
        params, m = step(params, batch)
        losses.append(float(m["loss"]))
        grad_norms.append(float(m["grad_norm"]))
    final_loss = float(binary_loss(l2)(nnx.merge(graphdef, params), batch))
    return nnx.merge(graphdef, params), losses + [final_loss], grad_norms


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="directory for metrics and figures")
    p.add_argument("--steps", type=int, default=500, help="optax steps for each part")
    p.add_argument("--newton-steps", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.05, help="Adam learning rate (cosine decay)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    start = time.perf_counter()
    progress = not args.no_progress

    # ---- Part 1: binary, breast cancer -------------------------------------------------------
    bc = _data.breast_cancer()
    C = 1.0  # scikit-learn's default
    l2 = 1.0 / (C * len(bc.y_train))

    opt_model, opt_losses = fit_optax(
        bc, l2=l2, steps=args.steps, lr=args.lr, seed=args.seed, progress=progress
    )
    newton_model, newton_losses, grad_norms = fit_newton(
        bc, l2=l2, steps=args.newton_steps, seed=args.seed
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # the reference must have converged
        sk = LogisticRegression().fit(bc.x_train, bc.y_train)

    probs = {
        "optax": _train.predict(lambda x: jax.nn.sigmoid(opt_model(x)), bc.x_test),
        "newton": _train.predict(lambda x: jax.nn.sigmoid(newton_model(x)), bc.x_test),
        "sklearn": sk.predict_proba(bc.x_test)[:, 1],
    }
    results = {name: scores(bc.y_test, p) for name, p in probs.items()}
    objective = binary_loss(l2)
    full = {"x": jnp.asarray(bc.x_train), "y": jnp.asarray(bc.y_train, jnp.float32)}
    sk_model = _models.Linear(bc.x_train.shape[1], 1, rngs=nnx.Rngs(0))
    sk_model.dense.kernel[...] = jnp.asarray(sk.coef_.T, jnp.float32)
    sk_model.dense.bias[...] = jnp.asarray(sk.intercept_, jnp.float32)
    for name, model in (("optax", opt_model), ("newton", newton_model), ("sklearn", sk_model)):
        results[name]["train_objective"] = float(objective(model, full))
    tol = 1e-4
    converged = next((i + 1 for i, g in enumerate(grad_norms[1:]) if g < tol), None)
    results["newton"]["iterations"] = args.newton_steps
    results["newton"]["converged_after"] = converged

    # ---- Part 2: multinomial, digits ---------------------------------------------------------
    dg = _data.digits()
    dg_model, dg_losses = fit_optax(
        dg,
        l2=1.0 / len(dg.y_train),
        steps=args.steps,
        lr=args.lr,
        seed=args.seed,
        progress=progress,
        classes=10,
        batch_size=128,
    )
    dg_pred = _train.predict(lambda x: jnp.argmax(dg_model(x), -1), dg.x_test)
    sk_dg = LogisticRegression(max_iter=1000).fit(dg.x_train, dg.y_train)
    dg_full = {"x": jnp.asarray(dg.x_train), "y": jnp.asarray(dg.y_train)}
    sk_dg_model = _models.Linear(dg.x_train.shape[1], 10, rngs=nnx.Rngs(0))
    sk_dg_model.dense.kernel[...] = jnp.asarray(sk_dg.coef_.T, jnp.float32)
    sk_dg_model.dense.bias[...] = jnp.asarray(sk_dg.intercept_, jnp.float32)
    dg_objective = multiclass_loss(1.0 / len(dg.y_train))
    digits = {
        "optax": {
            "accuracy": float(np.mean(dg_pred == dg.y_test)),
            "train_objective": float(dg_objective(dg_model, dg_full)),
        },
        "sklearn": {
            "accuracy": float(sk_dg.score(dg.x_test, dg.y_test)),
            "train_objective": float(dg_objective(sk_dg_model, dg_full)),
        },
    }

    ref = results["sklearn"]
    goals = {
        f"{name}_log_loss_within_5pct": results[name]["log_loss"] <= 1.05 * ref["log_loss"]
        for name in ("optax", "newton")
    } | {
        f"{name}_accuracy_within_1pt": results[name]["accuracy"] >= ref["accuracy"] - 0.01
        for name in ("optax", "newton")
    }
    metrics = {
        "breast_cancer": {
            "n_train": len(bc.y_train),
            "n_test": len(bc.y_test),
            "C": C,
            "l2": l2,
            **results,
        },
        "digits": {"n_train": len(dg.y_train), "n_test": len(dg.y_test), **digits},
        "goals": goals,
        "history": {
            "optax_loss": [float(v) for v in opt_losses],
            "newton_loss": newton_losses,
            "newton_grad_norm": grad_norms,
            "digits_loss": [float(v) for v in dg_losses],
        },
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "seconds": time.perf_counter() - start,
    }

    print(
        f"\nBreast cancer, test split (n={len(bc.y_test)}); "
        f"objective: mean BCE + {l2:.3g}/2 ||w||^2"
    )
    print(f"  {'fit':<36}{'accuracy':>10}{'log loss':>10}{'train obj':>11}")
    labels = {
        "optax": f"jbce + optax Adam ({args.steps} steps)",
        "newton": f"jbce + Newton ({args.newton_steps} steps)",
        "sklearn": "scikit-learn LogisticRegression()",
    }
    for name, label in labels.items():
        r = results[name]
        print(
            f"  {label:<36}{r['accuracy']:>10.4f}{r['log_loss']:>10.4f}"
            f"{r['train_objective']:>11.5f}"
        )
    print(f"  Newton gradient norm < {tol:g} after {converged} step(s)")
    print(f"\nDigits, multinomial, test split (n={len(dg.y_test)})")
    print(f"  {'fit':<48}{'accuracy':>10}{'train obj':>11}")
    for name, label in (
        ("optax", f"jbce + optax Adam ({args.steps} steps)"),
        ("sklearn", "scikit-learn LogisticRegression(max_iter=1000)"),
    ):
        r = digits[name]
        print(f"  {label:<48}{r['accuracy']:>10.4f}{r['train_objective']:>11.5f}")
    print(f"\nGoals met: {all(goals.values())} {goals}")

    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        np.save(args.out / "test_probs.npy", probs["newton"].astype(np.float32))
        optimum = "scikit-learn's optimum"
        best = results["sklearn"]["train_objective"]

        def gap(values):  # above scikit-learn's optimum; float32 ties (<= 0) are not drawn
            g = np.asarray(values, np.float64) - best
            return np.where(g > 0, g, np.nan)

        gap_title = "breast cancer: objective minus scikit-learn's optimum"
        _plot.subplots_curves(
            args.out / "loss_curve.png",
            {
                "breast cancer: optax Adam (full batch)": {"train objective": opt_losses},
                "breast cancer: Newton's method": {"train objective": newton_losses},
                gap_title: {"optax Adam": gap(opt_losses), "Newton": gap(newton_losses)},
                "digits: optax Adam (minibatches of 128)": {"minibatch objective": dg_losses},
            },
            xlabels={
                "breast cancer: Newton's method": "Newton iteration",
                gap_title: "Adam step or Newton iteration (log)",
            },
            ylabels={gap_title: "excess objective"},
            log_x=(gap_title,),
            hlines={
                "breast cancer: optax Adam (full batch)": {
                    optimum: results["sklearn"]["train_objective"]
                },
                "breast cancer: Newton's method": {optimum: results["sklearn"]["train_objective"]},
                "digits: optax Adam (minibatches of 128)": {
                    optimum: digits["sklearn"]["train_objective"]
                },
            },
            log_y=True,
        )
        print(f"wrote {args.out}/metrics.json, test_probs.npy, loss_curve.png")
    return metrics


if __name__ == "__main__":
    main()
