"""The deviceless compile checks of ``tests/test_accelerators.py``: what XLA compiles for an H100
and a TPU v5e, without either.

Run in one subprocess by the accelerator environment's python (jax with its CUDA and TPU
plugins; ``bash .ci/accelerators.sh`` builds ``.venv-accel``)::

    PYTHONPATH=. JAX_PLATFORMS=cpu .venv-accel/bin/python -m tests.deviceless --json out.json

It compiles, the two platforms side by side (XLA compiles outside the GIL):

- ``conditionals``: every public loss (:func:`conditional_cases`: each reduction, dtype and
  option set at a tiny and a 2**15-2**17-element size, forward and value_and_grad) as one
  module for the H100, and the calls whose program differs on a TPU
  (:func:`differs_on_tpu`) as one module for the TPU v5e; the ``conditional`` count of each
  call, attributed by a named scope.
- ``pallas``: ``implementation="pallas"`` value_and_grad at a ragged shape (kernels, Pallas
  custom calls, conditionals), alone and inside ``shard_map`` (``check_vma=True``) with
  class weights (:data:`PALLAS_SHARD_MAP_OPTIONS`).
- ``distill``: the fused distillation loss at the bench shape on the H100 (float32
  value_and_grad) against the materialised JSD.

Every other figure (HBM, temp, the performance targets) is ``python -m
bench.accelerators``'s report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import hlo

# Batches on either side of the sizes at which a loss may switch implementation: a tiny one,
# and one of 2**15 elements (binary) or 2**17 logits (softmax, fused linear) whose rows are
# longer than a GPU reduces in one kernel (jbce._softmax.stats.GPU_ROW_BOUND: the GPU and
# TPU programs differ there) and span several vocabulary tiles. Deviceless compile time
# grows with the shapes (TPU), so the large size is only as large as it needs to be.
SIZES = {
    "small": {"N": 8, "K": 16, "D": 4, "B": (8, 16)},
    "large": {"N": 4, "K": 32768, "D": 16, "B": (128, 256)},
}
BINARY = ("sigmoid_binary_cross_entropy", "binary_cross_entropy", "sigmoid_focal_loss",
          "discriminator_loss", "generator_loss")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Variant:
    """One call of a public loss: ``fn(*args)`` for arguments of ``specs`` (``(shape,
    dtype)``), differentiated w.r.t. ``argnums`` for value_and_grad."""

    loss: str
    options: str
    dtype: str
    size: str
    fn: Callable
    specs: tuple[tuple[tuple[int, ...], str], ...]
    argnums: tuple[int, ...] = (0,)

    @property
    def label(self) -> str:
        return f"{self.loss}[{self.options}] {self.dtype} {self.size}"


def _variants(dtype: str, size: str, *, wrappers: bool, options: bool, reductions) -> list[Variant]:
    """The public losses at ``size`` in ``dtype``: each of ``reductions``; with ``wrappers`` also
    entropy, KL and the GAN losses; with ``options`` weights, masks, label smoothing, z-loss,
    soft-capping, class weights, ``pos_weight``, focal alpha/gamma, ``chunk_size``."""
    import jax.numpy as jnp

    import jbce

    z = SIZES[size]
    N, K, D, BX = z["N"], z["K"], z["D"], z["B"]
    X, S32, M = dtype, "int32", "bool"
    out: list[Variant] = []

    def add(loss, opts, fn, specs, argnums=(0,)):
        out.append(Variant(loss, opts, dtype, size, fn, tuple(specs), tuple(argnums)))

    bce, bce_p = jbce.sigmoid_binary_cross_entropy, jbce.binary_cross_entropy
    focal = jbce.sigmoid_focal_loss
    ce, sce = jbce.softmax_cross_entropy_with_integer_labels, jbce.softmax_cross_entropy
    lin = jbce.linear_softmax_cross_entropy
    bxy = [(BX, X), (BX, X)]  # binary logits (or probabilities) and float labels
    xl = [((N, K), X), ((N,), S32)]  # logits, integer labels
    xy = [((N, K), X), ((N, K), X)]  # logits, label distributions
    hwl = [((N, D), X), ((D, K), X), ((N,), S32)]  # hidden, weight, labels
    for r in reductions:
        add("sigmoid_binary_cross_entropy", r, lambda x, y, r=r: bce(x, y, reduction=r), bxy)
        add("binary_cross_entropy", r, lambda p, y, r=r: bce_p(p, y, reduction=r), bxy)
        add("sigmoid_focal_loss", r, lambda x, y, r=r: focal(x, y, reduction=r), bxy)
        add(
            "softmax_cross_entropy_with_integer_labels",
            r,
            lambda x, y, r=r: ce(x, y, reduction=r),
            xl,
        )
        add("softmax_cross_entropy", r, lambda x, y, r=r: sce(x, y, reduction=r), xy)
        add(
            "linear_softmax_cross_entropy",
            r,
            lambda h, w, y, r=r: lin(h, w, y, reduction=r),
            hwl,
            (0, 1),
        )
        if r == "mean":  # per-token outputs, no reduction: once per size
            add(
                "linear_log_probs",
                "",
                lambda h, w, y: jnp.stack(jbce.linear_log_probs(h, w, y)),
                hwl,
                (0, 1),
            )
        # Losses newer than the ones above, where this jbce has them.
        for name, specs, argnums in _SOFTMAX_FAMILY:
            f = getattr(jbce, name, None)
            if f is not None:
                add(name, r, lambda *a, f=f, r=r: f(*a, reduction=r), [xl, xy][specs], argnums)
        if hasattr(jbce, "linear_distillation_loss"):
            add(
                "linear_distillation_loss",
                r,
                lambda h, w, ht, wt, r=r: jbce.linear_distillation_loss(h, w, ht, wt, reduction=r),
                hwl[:2] + hwl[:2],
                (0, 1),
            )
        emb = [((N, D), X), ((N, D), X), ((), "float32"), ((), "float32")]  # x, y, scale, bias
        opts = {"ids": None, "chunk_size": None}
        if options:  # duplicate ids; tiles whose last row and column chunks overlap
            opts = {"ids": jnp.arange(N) // 2, "chunk_size": (3, 5)}
        name = r + (",ids,chunk_size=(3, 5)" if options else "")
        add("clip_loss", name,
            lambda x, y, s, b, r=r, o=opts: jbce.clip_loss(x, y, scale=s, reduction=r, **o),
            emb, (0, 1, 2))  # fmt: skip
        add("siglip_loss", name,
            lambda x, y, s, b, r=r, o=opts: jbce.siglip_loss(x, y, scale=s, bias=b, reduction=r,
                                                             **o),
            emb, (0, 1, 2, 3))  # fmt: skip
    if wrappers:
        add("entropy", "", lambda p: jbce.entropy(p), xy[:1])
        add("kl_divergence", "", lambda x, y: jbce.kl_divergence(x, y), xy, (0, 1))
        add("discriminator_loss", "", lambda a, b: jbce.discriminator_loss(a, b), bxy, (0, 1))
        add("generator_loss", "", lambda a: jbce.generator_loss(a), bxy[:1])
    if not options:
        return out
    bw = [(BX, X), (BX[-1:], X), (BX, M)]  # weights, pos_weight (last axis), where
    add(
        "sigmoid_binary_cross_entropy",
        "weights,pos_weight,where,label_smoothing",
        lambda x, y, w, pw, m: bce(x, y, weights=w, pos_weight=pw, where=m, label_smoothing=0.1),
        bxy + bw,
    )
    add(
        "sigmoid_binary_cross_entropy",
        "where,sum",
        lambda x, y, m: bce(x, y, where=m, reduction="sum"),
        bxy + bw[2:],
    )
    add(
        "binary_cross_entropy",
        "weights,where,label_smoothing",
        lambda p, y, w, m: bce_p(p, y, weights=w, where=m, label_smoothing=0.1),
        bxy + [bw[0], bw[2]],
    )
    add(
        "sigmoid_focal_loss",
        "alpha=0.25,gamma=2,weights,where",
        lambda x, y, w, m: focal(x, y, alpha=0.25, gamma=2.0, weights=w, where=m),
        bxy + [bw[0], bw[2]],
    )
    add("sigmoid_focal_loss", "gamma=0.5", lambda x, y: focal(x, y, gamma=0.5), bxy)
    add(
        "sigmoid_focal_loss",
        "alpha=0.75,gamma=0",
        lambda x, y: focal(x, y, alpha=0.75, gamma=0.0),
        bxy,
    )
    add(
        "softmax_cross_entropy_with_integer_labels",
        "class_weights,weights,label_smoothing",
        lambda x, y, cw, w: ce(x, y, class_weights=cw, weights=w, label_smoothing=0.1),
        xl + [((K,), X), ((N,), X)],
    )
    add(
        "softmax_cross_entropy_with_integer_labels",
        "z_loss,logit_softcap,ignore_index=None",
        lambda x, y: ce(x, y, z_loss=1e-4, logit_softcap=30.0, ignore_index=None),
        xl,
    )
    add(
        "softmax_cross_entropy_with_integer_labels",
        "where per example",
        lambda x, y, m: ce(x, y, where=m),
        xl + [((N,), M)],
    )
    add(
        "softmax_cross_entropy_with_integer_labels",
        "where per logit,sum",
        lambda x, y, m: ce(x, y, where=m, reduction="sum"),
        xl + [((N, K), M)],
    )
    add(
        "softmax_cross_entropy",
        "weights,label_smoothing,where per example",
        lambda x, y, w, m: sce(x, y, weights=w, label_smoothing=0.1, where=m),
        xy + [((N,), X), ((N,), M)],
    )
    add(
        "softmax_cross_entropy",
        "where per logit",
        lambda x, y, m: sce(x, y, where=m),
        xy + [((N, K), M)],
    )
    add(
        "linear_softmax_cross_entropy",
        "bias,weights,label_smoothing,z_loss,logit_softcap",
        lambda h, w, y, b, wt: lin(
            h, w, y, bias=b, weights=wt, label_smoothing=0.1, z_loss=1e-4, logit_softcap=30.0
        ),
        hwl + [((K,), X), ((N,), X)],
        (0, 1, 3),
    )
    add(
        "linear_softmax_cross_entropy",
        "class_weights,label_smoothing,ignore_index=None",
        lambda h, w, y, cw: lin(h, w, y, class_weights=cw, label_smoothing=0.1, ignore_index=None),
        hwl + [((K,), X)],
        (0, 1, 3),
    )
    add(
        "linear_log_probs",
        "bias,temperature,chunk_size=(N/2,K/2)",
        lambda h, w, y, b, t: jnp.stack(
            jbce.linear_log_probs(h, w, y, bias=b, temperature=t, chunk_size=(N // 2, K // 2))
        ),
        hwl + [((K,), X), ((), "float32")],
        (0, 1, 3, 4),
    )
    add(
        "linear_softmax_cross_entropy",
        "ignore_index=None,chunk_size=K/2",
        lambda h, w, y: lin(h, w, y, ignore_index=None, chunk_size=K // 2),
        hwl,
        (0, 1),
    )
    if hasattr(jbce, "linear_distillation_loss"):
        dist = jbce.linear_distillation_loss
        add(
            "linear_distillation_loss",
            "beta=0,temperature=2,bias,teacher_bias,labels,weights,chunk_size=K/2",
            lambda h, w, ht, wt, b, bt, y, wt_: dist(
                h, w, ht, wt, beta=0.0, temperature=2.0, bias=b, teacher_bias=bt, labels=y,
                weights=wt_, chunk_size=K // 2,
            ),
            hwl[:2] + hwl[:2] + [((K,), X), ((K,), X), ((N,), S32), ((N,), X)],
            (0, 1, 2, 3, 4, 5),
        )  # fmt: skip
        add(
            "linear_distillation_loss",
            "traced beta and temperature,beta=1,sum",
            lambda h, w, ht, wt, b, t: (
                dist(h, w, ht, wt, beta=b, temperature=t, reduction="sum")
                + dist(h, w, ht, wt, beta=1.0, reduction="sum")
            ),
            hwl[:2] + hwl[:2] + [((), X), ((), X)],
            (0, 1, 4, 5),
        )
    extra = {  # name: (options, call, extra argument specs)
        "softmax_focal_loss": (
            "alpha=0.25,gamma=0.5,weights,where per logit",
            lambda f, x, y, w, m: f(x, y, alpha=0.25, gamma=0.5, weights=w, where=m),
            [((N,), X), ((N, K), M)],
        ),
        "softmax_focal_loss_with_integer_labels": (
            "alpha[K],class_weights,ignore_index=None,where",
            lambda f, x, y, a, cw, m: f(
                x, y, alpha=a, class_weights=cw, ignore_index=None, where=m
            ),
            [((K,), X), ((K,), X), ((N,), M)],
        ),
        "poly_loss_cross_entropy": (
            "epsilon=1,weights,where",
            lambda f, x, y, w, m: f(x, y, epsilon=1.0, weights=w, where=m),
            [((N,), X), ((N,), M)],
        ),
        "nll_loss": (
            "class_weights,weights,where",
            lambda f, x, y, cw, w, m: f(x, y, class_weights=cw, weights=w, where=m),
            [((K,), X), ((N,), X), ((N,), M)],
        ),
        "categorical_cross_entropy": (
            "label_smoothing,where per probability",
            lambda f, x, y, m: f(x, y, label_smoothing=0.1, where=m),
            [((N, K), M)],
        ),
        "jensen_shannon_divergence": (
            "beta=0.3,temperature=2,weights,where",
            lambda f, x, y, w, m: f(x, y, beta=0.3, temperature=2.0, weights=w, where=m),
            [((N,), X), ((N,), M)],
        ),
    }
    for name, specs, argnums in _SOFTMAX_FAMILY:
        f = getattr(jbce, name, None)
        if f is not None and name in extra:
            opts, call, more = extra[name]
            add(name, opts, lambda *a, f=f, c=call: c(f, *a), [xl, xy][specs] + more, argnums)
    return out


# Softmax-family losses taking (logits-like, labels): name, 0 = integer labels / 1 = label
# distributions (or a second logits), value_and_grad argnums. Looked up with getattr, so the
# check runs on a jbce that predates some of them (the coverage test pins jbce.__all__).
_SOFTMAX_FAMILY = (
    ("softmax_focal_loss", 1, (0,)),
    ("softmax_focal_loss_with_integer_labels", 0, (0,)),
    ("poly_loss_cross_entropy", 1, (0,)),
    ("nll_loss", 0, (0,)),
    ("categorical_cross_entropy", 1, (0,)),
    ("jensen_shannon_divergence", 1, (0, 1)),
)


# (dtype, size, wrappers, options, reductions): every loss in each dtype at each size; the
# thin wrappers (entropy, KL, GAN) in three of them, every reduction in one (the reduction
# is applied to the per-example losses, the same code whatever the size or dtype), the option
# variants at the large size (several tiles, rows cut into pieces) in one, so that the
# check compiles each code path once (about 120 calls).
CHECK_GRID = (
    ("float32", "small", True, False, ("none", "sum", "mean")),
    ("bfloat16", "small", True, False, ("mean",)),
    ("float32", "large", True, False, ("mean",)),
    ("bfloat16", "large", False, True, ("mean",)),
)


def differs_on_tpu(v: Variant) -> bool:
    """Whether a call's TPU program differs from its GPU one: the softmax statistics take a
    TPU branch (jbce._softmax.stats.row_reduce: rows not cut into pieces) at rows longer
    than the GPU bound, i.e. every loss but the binary ones at the large size; float32
    stands for bfloat16 there (the branch does not depend on the dtype)."""
    return v.size == "large" and v.dtype == "float32" and v.loss not in BINARY


def conditional_cases() -> list[Variant]:
    """The calls the no-conditional check compiles (:data:`CHECK_GRID`; each forward and
    value_and_grad)."""
    out = []
    for dtype, size, wrappers, options, reductions in CHECK_GRID:
        out += _variants(dtype, size, wrappers=wrappers, options=options, reductions=reductions)
    return out


def _both_modes(v: Variant) -> Callable:
    """``fn(*args) -> (forward, value_and_grad)`` of a variant (``"none"`` summed for vag)."""
    import jax
    import jax.numpy as jnp

    vag = jax.value_and_grad(lambda *a: jnp.sum(v.fn(*a)), argnums=v.argnums)
    return lambda *a: (v.fn(*a), vag(*a))


_SCOPE = "jbce_check_case"


def _conditional_scopes(text: str) -> list[int | None]:
    """For each ``conditional`` of a module, the case index of the ``jbce_check_case<k>``
    named scope in its metadata (None when it carries none)."""
    out = []
    for c in hlo.parse_hlo(text).values():
        for i in c.instrs:
            if i.opcode == "conditional":
                m = re.search(rf"{_SCOPE}(\d+)\b", i.attrs)
                out.append(int(m.group(1)) if m else None)
    return out


def check_conditionals(platforms=hlo.PLATFORMS, log=None) -> dict:
    """``conditional`` count of each of :func:`conditional_cases` per platform (on the TPU,
    those :func:`differs_on_tpu` selects).

    Each platform's calls are compiled as one module, each under a named scope, and each
    conditional is attributed to its call by the scope in its metadata (a conditional with
    none is reported as unattributed). Returns ``{"results": [...], "unattributed": {...},
    "seconds": {...}}``.
    """
    import jax

    every = conditional_cases()
    chosen = {p: [v for v in every if p == "gpu" or differs_on_tpu(v)] for p in platforms}

    def run(platform):
        cases = chosen[platform]
        fns = [_both_modes(v) for v in cases]
        bounds = [0]
        for v in cases:
            bounds.append(bounds[-1] + len(v.specs))

        def together(*args):
            out = []
            for k, (f, b0, b1) in enumerate(zip(fns, bounds, bounds[1:])):
                with jax.named_scope(f"{_SCOPE}{k}"):
                    out.append(f(*args[b0:b1]))
            return out

        specs = [s for v in cases for s in v.specs]
        t0 = time.perf_counter()
        scopes = _conditional_scopes(hlo.compile_for(together, specs, platform).as_text())
        dt = round(time.perf_counter() - t0, 1)
        if log:
            name = hlo.DEVICE_NAMES[platform]
            log(f"{name}: {len(cases)} calls (forward and value_and_grad) compiled in {dt}s, "
                f"{len(scopes)} conditionals", flush=True)  # fmt: skip
        return scopes, dt

    done = _side_by_side(run, platforms)
    results, unattributed, seconds = [], {}, {}
    for platform in platforms:
        scopes, seconds[platform] = done[platform]
        unattributed[platform] = sum(s is None for s in scopes)
        for k, v in enumerate(chosen[platform]):
            results.append(
                {
                    "platform": platform,
                    "loss": v.loss,
                    "options": v.options,
                    "dtype": v.dtype,
                    "size": v.size,
                    "conditionals": scopes.count(k),
                }
            )
    return {"results": results, "unattributed": unattributed, "seconds": seconds}


def _side_by_side(run, platforms) -> dict:
    """``{platform: run(platform)}``, the platforms compiled in threads."""
    for p in platforms:  # create the devices before the threads do
        hlo.device(p)
    with ThreadPoolExecutor(max_workers=len(platforms)) as pool:
        return dict(zip(platforms, pool.map(run, platforms)))


PALLAS_SHARD_MAP_OPTIONS = {
    "class_weights": {},
    "class_weights_smoothing": {"label_smoothing": 0.1},
}


def pallas_shard_map_compile(
    platform: str, n: int = 512, d: int = 128, v: int = 4096, **options
) -> dict:
    """value_and_grad of ``implementation="pallas"`` with class weights inside ``shard_map``
    (``check_vma=True``, the default; a one-device ``"vocab"`` axis) compiled for
    ``platform``, with the other loss ``options`` (:data:`PALLAS_SHARD_MAP_OPTIONS`):
    ``{"pallas_calls": ..., "conditionals": ...}``. The kernels' outputs must carry the
    mesh-axis types there (interpret mode cannot check this: see
    tests/test_eight_devices.py)."""
    import jax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jbce

    mesh = Mesh([hlo.device(platform)], ("vocab",))

    def loss(h, w, y, c):
        return jbce.linear_softmax_cross_entropy(
            h, w, y, class_weights=c, axis_name="vocab", implementation="pallas", **options
        )

    f = jax.shard_map(
        loss, mesh=mesh, in_specs=(P(), P(None, "vocab"), P(), P("vocab")), out_specs=P()
    )
    specs = (((n, d), "float32", P()), ((d, v), "float32", P(None, "vocab")),
             ((n,), "int32", P()), ((v,), "float32", P("vocab")))  # fmt: skip
    args = [jax.ShapeDtypeStruct(s, t, sharding=NamedSharding(mesh, p)) for s, t, p in specs]
    text = jax.jit(jax.value_and_grad(f, (0, 1, 3))).lower(*args).compile().as_text()
    return {
        "pallas_calls": hlo.pallas_custom_calls(text),
        "conditionals": hlo.count_conditionals(text),
    }


# (N, D, V): a ragged shape (N, V not multiples of any block size, D of the dot's; the
# kernel count does not depend on the shape: `python -m bench.accelerators --pallas` reports
# the bench shape). The Triton compile takes minutes at the bench shape, seconds here.
PALLAS_SHAPE = (300, 96, 1000)


def pallas_checks(platforms=hlo.PLATFORMS) -> dict:
    """``implementation="pallas"`` value_and_grad (float32) at :data:`PALLAS_SHAPE`, alone and
    inside ``shard_map`` (:data:`PALLAS_SHARD_MAP_OPTIONS`), per platform: kernels, Pallas
    custom calls and conditionals."""
    import jax

    import jbce

    def loss(h, w, y):
        return jbce.linear_softmax_cross_entropy(h, w, y, implementation="pallas")

    def run(platform):
        n, d, v = PALLAS_SHAPE
        specs = (((n, d), "float32"), ((d, v), "float32"), ((n,), "int32"))
        text = hlo.compile_for(jax.value_and_grad(loss, (0, 1)), specs, platform).as_text()
        st = hlo.analyse_hlo(text)
        row = {"platform": platform, "kernels": st.kernels, "conditionals": st.conditionals,
               "pallas_calls": hlo.pallas_custom_calls(text)}  # fmt: skip
        shard_map = {
            name: pallas_shard_map_compile(platform, n, d, v, **options)
            for name, options in PALLAS_SHARD_MAP_OPTIONS.items()
        }
        return [row], shard_map

    done = _side_by_side(run, platforms)
    return {
        "rows": [r for p in platforms for r in done[p][0]],
        "shard_map": {p: done[p][1] for p in platforms},
    }


def distill_check() -> dict:
    """The fused distillation loss and the materialised JSD, value_and_grad w.r.t. the
    student at N=4096, D=512, V=32768 float32 on the H100: :func:`bench.hlo.compiled_stats`
    of each (``"fused"``, ``"materialised"``)."""
    import jax
    import jax.numpy as jnp

    import jbce

    impls = {
        "fused": lambda h, w, ht, wt: jbce.linear_distillation_loss(h, w, ht, wt),
        "materialised": lambda h, w, ht, wt: jbce.jensen_shannon_divergence(
            jnp.matmul(h, w), jnp.matmul(ht, wt)
        ),
    }
    hw = (((4096, 512), "float32"), ((512, 32768), "float32"))
    out = {}
    for name, f in impls.items():
        g = jax.value_and_grad(f, argnums=(0, 1))
        out[name] = hlo.compiled_stats(hlo.compile_for(g, hw + hw, "gpu"))
    return out


CHECKS = ("conditionals", "pallas", "distill")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tests.deviceless", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--json-stdout", action="store_true", help="print the results as the last line")
    p.add_argument(
        "--checks", default=",".join(CHECKS), help=f"comma-separated: {', '.join(CHECKS)}"
    )
    args = p.parse_args(argv)
    hlo.setup_environment()
    doc, t0 = {}, time.perf_counter()
    for check in args.checks.split(","):
        t1 = time.perf_counter()
        if check == "conditionals":
            doc[check] = check_conditionals(log=print)
            bad = [r for r in doc[check]["results"] if r["conditionals"]]
            for r in bad:
                print(f"conditional: {hlo.DEVICE_NAMES[r['platform']]} {r['loss']}[{r['options']}] "
                      f"{r['dtype']} {r['size']}: {r['conditionals']}")  # fmt: skip
        elif check == "pallas":
            doc[check] = pallas_checks()
        elif check == "distill":
            doc[check] = distill_check()
        else:
            p.error(f"unknown check {check!r}")
        doc.setdefault("seconds", {})[check] = round(time.perf_counter() - t1, 1)
        print(f"{check}: {doc['seconds'][check]}s", flush=True)
    print(f"deviceless checks in {time.perf_counter() - t0:.0f}s")
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    if args.json_stdout:  # tests/_once.py reads the last line
        print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
