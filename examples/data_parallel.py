"""Data-parallel training over all local devices: the same step, the batch split across them.

Multinomial logistic regression on scikit-learn's 8x8 digits with
``jbce.softmax_cross_entropy_with_integer_labels``, the pure ``train_step`` from
``examples/_train.py``. Each minibatch is placed with ``NamedSharding(mesh, P("data"))``
(rows split over the devices) and the model/optimizer state is replicated; ``jax.jit``
partitions the step, so every device computes the loss of its rows and XLA all-reduces the
gradients. The loss's ``"mean"`` is over the *global* batch (the denominators are global), so
the run equals a single-device run up to float rounding, which the script checks.

Run on 8 simulated CPU devices::

    python -m examples.data_parallel --cpu-devices 8 --steps 200

Typical output (2-core CPU dev box, jax 0.10.2, that command)::

    8 devices, batch 128 split 16 per device
    data-parallel: final loss 0.0867 test accuracy 0.9667
    single device: final loss 0.0867; max |param difference| 7.2e-07
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python examples/data_parallel.py`: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jbce  # noqa: E402
from examples import _data, _models, _train  # noqa: E402


def loss_fn(model, batch):
    return jbce.softmax_cross_entropy_with_integer_labels(model(batch["x"]), batch["y"])


def train(split, *, steps: int, batch_size: int, lr: float, mesh: Mesh | None, seed: int = 0):
    """Runs ``steps`` Adam steps; with a mesh, batches are split over its "data" axis."""
    model = _models.Linear(split.x_train.shape[1], 10, rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    step = jax.jit(_train.supervised_step(graphdef, loss_fn), donate_argnums=0)
    if mesh is not None:
        state = jax.device_put(state, NamedSharding(mesh, P()))  # replicated
        rows = NamedSharding(mesh, P("data"))
    losses = []
    for idx in _data.batches(len(split.x_train), batch_size, steps, seed):
        batch = {"x": split.x_train[idx], "y": split.y_train[idx]}
        batch = {k: jax.device_put(v, rows) if mesh is not None else jnp.asarray(v)
                 for k, v in batch.items()}  # fmt: skip
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    model, _ = nnx.merge(graphdef, state)
    logits = _train.predict(model, split.x_test)
    accuracy = float(np.mean(np.argmax(logits, -1) == split.y_test))
    params = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    return losses, accuracy, params


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--cpu-devices", type=int, help="force N CPU devices (simulated)")
    ap.add_argument("--out", type=Path, help="write metrics JSON here")
    ap.add_argument("--plot", type=Path, help="write the two runs' loss curves here (PNG)")
    args = ap.parse_args(argv)
    if args.cpu_devices:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)

    n = jax.local_device_count()
    if args.batch_size % n:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of {n} devices")
    mesh = Mesh(np.array(jax.local_devices()), ("data",))
    print(f"{n} devices, batch {args.batch_size} split {args.batch_size // n} per device")
    split = _data.digits()
    kw = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr}
    losses, acc, params = train(split, mesh=mesh, **kw)
    print(f"data-parallel: final loss {losses[-1]:.4f} test accuracy {acc:.4f}")
    ref_losses, _, ref_params = train(split, mesh=None, **kw)
    diff = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True)
    )
    print(f"single device: final loss {ref_losses[-1]:.4f}; max |param difference| {diff:.1e}")
    metrics = {
        "devices": n,
        "losses": losses,
        "single_device_losses": ref_losses,
        "test_accuracy": acc,
        "max_param_difference": diff,
    }
    if args.out:
        args.out.write_text(json.dumps(metrics))
    if args.plot:
        from examples import _plot

        title = f"digits, batch {args.batch_size}: {n} devices and 1 device"
        diff_title = "|loss on the devices - loss on one device|"
        difference = np.abs(np.asarray(losses) - np.asarray(ref_losses))
        _plot.subplots_curves(
            args.plot,
            {
                title: {f"{n} devices": losses, "1 device": ref_losses},
                diff_title: {"difference": np.where(difference > 0, difference, np.nan)},
            },
            xlabels={},
            ylabels={title: "minibatch loss", diff_title: "absolute difference"},
            log_y=(diff_title,),
        )
        print(f"wrote {args.plot}")
    return metrics


if __name__ == "__main__":
    main()
