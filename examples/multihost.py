"""A multi-host training step: batch over hosts, vocabulary over each host's devices.

A softmax-regression "language model head" ``logits = h @ W`` with ``W`` of shape
``[D, V]`` trained by SGD on ``jbce.softmax_cross_entropy_with_integer_labels``. The mesh is
``("data", "vocab")`` = ``(number of processes, local devices)``: each process reads its own
slice of the batch, ``W``'s vocabulary axis is split over the devices of a process, and the
loss runs vocabulary-parallel (``axis_name="vocab"``: per-shard max / sum-exp / target logit
combined with ``pmax``/``psum``, never gathering logits). The ``"mean"`` over the whole global
batch, with ignored tokens (``-100``) counted globally, is ``psum(sum) / psum(count)`` over
``"data"``. The same code runs unchanged on one process.

Local test (2 processes x 4 CPU devices, gloo collectives over 127.0.0.1)::

    python -m examples.multihost --local-processes 2 --cpu-devices 4 --steps 5

On a cluster, one process per host; ``jax.distributed.initialize()`` reads the coordinator,
process count and id from SLURM or the TPU/GPU environment (see the README)::

    export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7
    srun --nodes 2 --ntasks-per-node 1 python -m examples.multihost --distributed --steps 100

(on SLURM, auto-detection otherwise gives each process only device ``[SLURM_LOCALID]``).

Typical output (2-core CPU dev box, jax 0.10.2, the local test command above)::

    mesh {'data': 2, 'vocab': 4} over 2 processes, 8 devices
    step 0 loss 4.158883
    step 1 loss 3.992744
    step 2 loss 3.830030
    step 3 loss 3.670972
    step 4 loss 3.515853

(plus gloo's connection lines on stderr).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python examples/multihost.py`: make `jbce` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jbce  # noqa: E402

IGNORE = -100


def make_problem(*, batch: int = 64, dim: int = 16, vocab: int = 64, seed: int = 0):
    """Synthetic next-token data from a random teacher; every process builds the same arrays.

    Returns ``(h [batch, dim] float32, labels [batch] int32 with ~1/8 set to -100,
    W0 [dim, vocab] float32)``.
    """
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(batch, dim)).astype(np.float32)
    teacher = rng.normal(size=(dim, vocab)).astype(np.float32)
    labels = np.argmax(h @ teacher + rng.gumbel(size=(batch, vocab)), axis=-1).astype(np.int32)
    labels[rng.uniform(size=batch) < 0.125] = IGNORE
    return h, labels, np.zeros((dim, vocab), np.float32)


def global_mean_loss(w, h, labels):
    """Per-shard body: ``w`` [D, V_local], ``h`` [B_local, D], ``labels`` [B_local] (global ids)."""
    total = jbce.softmax_cross_entropy_with_integer_labels(
        h @ w, labels, reduction="sum", axis_name="vocab"
    )
    count = jnp.sum(labels != IGNORE).astype(jnp.float32)
    return jax.lax.psum(total, "data") / jax.lax.psum(count, "data")


def make_train_step(mesh: Mesh, lr: float):
    """A pure, jitted ``train_step(w, h, labels) -> (w, loss, grad)`` over ``mesh``."""
    loss = jax.shard_map(
        global_mean_loss,
        mesh=mesh,
        in_specs=(P(None, "vocab"), P("data"), P("data")),
        out_specs=P(),
    )

    @jax.jit
    def train_step(w, h, labels):
        value, grad = jax.value_and_grad(loss)(w, h, labels)
        return w - lr * grad, value, grad

    return train_step


def reference_losses(h, labels, w, *, steps: int, lr: float):
    """The same SGD on one device with the plain (unsharded) loss: the ground truth."""

    def loss(w):
        return jbce.softmax_cross_entropy_with_integer_labels(h @ w, labels)

    step = jax.jit(jax.value_and_grad(loss))
    losses, grad0 = [], None
    for _ in range(steps):
        value, grad = step(w)
        grad0 = grad if grad0 is None else grad0
        losses.append(float(value))
        w = w - lr * grad
    return losses, np.asarray(grad0)


def run(steps: int, lr: float) -> dict:
    """Builds the mesh over all processes' devices and runs ``steps`` SGD steps."""
    n_proc, n_local = jax.process_count(), jax.local_device_count()
    # Rows of the device grid are processes, so "vocab" collectives stay inside a host.
    devices = np.array(jax.devices()).reshape(n_proc, n_local)
    mesh = Mesh(devices, ("data", "vocab"))
    h, labels, w0 = make_problem()
    # Each process contributes only its own rows of the batch (what a real input pipeline
    # on each host would read).
    rows = np.array_split(np.arange(len(h)), n_proc)[jax.process_index()]
    batch = NamedSharding(mesh, P("data"))
    h_g = jax.make_array_from_process_local_data(batch, h[rows], h.shape)
    y_g = jax.make_array_from_process_local_data(batch, labels[rows], labels.shape)
    w = jax.device_put(jnp.asarray(w0), NamedSharding(mesh, P(None, "vocab")))
    train_step = make_train_step(mesh, lr)
    if jax.process_index() == 0:
        print(f"mesh {dict(mesh.shape)} over {n_proc} processes, {jax.device_count()} devices")
    losses, grad0 = [], None
    for i in range(steps):
        w, value, grad = train_step(w, h_g, y_g)
        if grad0 is None:
            from jax.experimental import multihost_utils

            grad0 = np.asarray(multihost_utils.process_allgather(grad, tiled=True))
        losses.append(float(value))  # replicated: every process holds the value
        if jax.process_index() == 0:
            print(f"step {i} loss {losses[-1]:.6f}")
    return {"losses": losses, "grad0": grad0.tolist(), "mesh": dict(mesh.shape)}


def plot(path: Path, result: dict, *, steps: int, lr: float) -> None:
    """The mesh run's losses next to :func:`reference_losses` (one device, unsharded loss)."""
    from examples import _plot

    h, labels, w0 = make_problem()
    with jax.default_device(jax.local_devices()[0]):
        reference, _ = reference_losses(h, labels, w0, steps=steps, lr=lr)
    mesh = " x ".join(f"{v} {k}" for k, v in result["mesh"].items())
    _plot.subplots_curves(
        path,
        {f"SGD on a ({mesh}) mesh and on one device": {
            f"mesh ({jax.process_count()} processes)": result["losses"],
            "one device": reference,
        }},
        xlabels={},
    )  # fmt: skip
    print(f"wrote {path}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(n: int, argv: list[str], timeout: float) -> int:
    """Starts ``n`` copies of this script on 127.0.0.1, as a cluster launcher would."""
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "examples.multihost",
                *argv,
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                str(n),
                "--process-id",
                str(i),
            ],
            cwd=Path(__file__).resolve().parent.parent,
        )  # fmt: skip
        for i in range(n)
    ]
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return max(abs(c) for c in codes)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--out", type=Path, help="process 0 writes losses and step-0 grads here")
    ap.add_argument(
        "--plot", type=Path, help="process 0 plots the losses next to a one-device run (PNG)"
    )
    ap.add_argument("--cpu-devices", type=int, help="force N CPU devices per process (testing)")
    ap.add_argument("--local-processes", type=int, help="launch N processes on this machine")
    ap.add_argument("--timeout", type=float, default=300, help="launcher: seconds to wait")
    ap.add_argument("--distributed", action="store_true", help="auto-detect a cluster")
    ap.add_argument("--coordinator", help="host:port of process 0")
    ap.add_argument("--num-processes", type=int)
    ap.add_argument("--process-id", type=int)
    args = ap.parse_args(argv)

    if args.local_processes:
        passthrough = ["--steps", str(args.steps), "--lr", str(args.lr)]
        if args.out:
            passthrough += ["--out", str(args.out)]
        if args.plot:
            passthrough += ["--plot", str(args.plot)]
        if args.cpu_devices:
            passthrough += ["--cpu-devices", str(args.cpu_devices)]
        sys.exit(launch_local(args.local_processes, passthrough, args.timeout))

    if args.cpu_devices:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
        # CPU collectives across processes need an implementation; gloo ships with jaxlib.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.coordinator:
        jax.distributed.initialize(
            args.coordinator, args.num_processes, args.process_id, initialization_timeout=120
        )
    elif args.distributed:
        jax.distributed.initialize()  # SLURM, Open MPI, Cloud TPU, ... detected from the env

    result = run(args.steps, args.lr)
    if args.out and jax.process_index() == 0:
        args.out.write_text(json.dumps(result))
    if args.plot and jax.process_index() == 0:
        plot(args.plot, result, steps=args.steps, lr=args.lr)
    if jax.process_count() > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
