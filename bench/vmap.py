"""Vmapped losses: the fast path's check made once per batch, against once per member.

Usage (from the repository root)::

    python -m bench.vmap                # 4 members of 512 x 8192 logits / 2^20 BCE elements
    python -m bench.vmap --quick        # 4 x 64 x 2048 / 2^16, a few seconds
    python -m bench.vmap --json out.json

Each loss is ``jax.jit(jax.vmap(f))`` with ``f`` the mean loss (``fwd``) or its
``value_and_grad`` (``vag``) over a leading axis of ``members`` independent batches, as in
an ensemble or a per-task loss. jbce checks the fast path's result with
``jbce._reduce.has_nan``, whose ``custom_vmap`` rule answers for the whole vmapped batch, so
the exact recomputation stays a ``lax.cond``:

- ``jbce``: the library as it is.
- ``per_member``: the same with ``has_nan`` a plain function, so the predicate is batched
  and ``vmap`` turns each ``cond`` into a ``select`` that runs both paths (what every vmapped
  ``lax.cond`` on data does).
- ``optax``: optax's loss, vmapped the same way.

Time is the median of interleaved rounds (``bench/timing.py``); every implementation's value
is checked against jbce's.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/vmap.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build(members: int, rows: int, classes: int, elements: int):
    """[(case, mode, {impl: (fn, args)})] for the three losses and both modes."""
    import jax
    import jax.numpy as jnp
    import optax

    import jbce

    kx, ky = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (members, rows, classes)) * 3
    labels = jax.random.randint(ky, (members, rows), 0, classes)
    soft = jax.nn.softmax(jax.random.normal(ky, (members, rows, classes)))
    xb = jax.random.normal(kx, (members, elements)) * 3
    yb = jax.random.uniform(ky, (members, elements))
    losses = {
        "ce_int": (
            jbce.softmax_cross_entropy_with_integer_labels,
            lambda a, b: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(a, b)),
            (x, labels),
        ),
        "ce_soft": (
            jbce.softmax_cross_entropy,
            lambda a, b: jnp.mean(optax.softmax_cross_entropy(a, b)),
            (x, soft),
        ),
        "bce": (
            jbce.sigmoid_binary_cross_entropy,
            lambda a, b: jnp.mean(optax.sigmoid_binary_cross_entropy(a, b)),
            (xb, yb),
        ),
    }
    cases = []
    for case, (ours, peer, args) in losses.items():
        for mode in ("fwd", "vag"):
            wrap = (lambda f: f) if mode == "fwd" else jax.value_and_grad
            impls = {"jbce": wrap(ours), "per_member": wrap(ours), "optax": wrap(peer)}
            cases.append((case, mode, impls, args))
    return cases


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="small shapes, fewer rounds")
    ap.add_argument("--budget", type=float, default=3.0, help="seconds of timed rounds per case")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rows, classes, elements = (64, 2048, 2**16) if args.quick else (512, 8192, 2**20)
    budget = 0.5 if args.quick else args.budget

    import jax
    import numpy as np

    from bench.timing import fmt_time, measure, simple_runner
    from jbce import _reduce

    batched_rule = _reduce._has_nan

    def compiled(fn, per_member, fn_args):
        # The per-member variant is traced with has_nan's custom_vmap rule removed.
        _reduce._has_nan = _reduce._nan_in_sum if per_member else batched_rule
        try:
            return jax.jit(jax.vmap(fn)).lower(*fn_args).compile()
        finally:
            _reduce._has_nan = batched_rule

    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; {args.members} members of "
          f"{rows} x {classes} logits (softmax) / {elements} elements (BCE), float32")  # fmt: skip
    print(f"{'case':8} {'mode':4} {'jbce':>9} {'per_member':>11} {'optax':>9}  per_member/jbce")
    results = []
    for case, mode, impls, fn_args in build(args.members, rows, classes, elements):
        fns = {name: compiled(fn, name == "per_member", fn_args) for name, fn in impls.items()}
        values = {name: f(*fn_args) for name, f in fns.items()}
        first = lambda v: np.asarray(v[0] if isinstance(v, tuple) else v)  # noqa: E731
        for v in values.values():
            np.testing.assert_allclose(first(v), first(values["jbce"]), rtol=2e-5)
        runners = {
            name: simple_runner(functools.partial(f, *fn_args), jax.block_until_ready)
            for name, f in fns.items()
        }
        t = {k: v["median"] for k, v in measure(runners, budget_s=budget).items()}
        ratio = t["per_member"] / t["jbce"]
        print(f"{case:8} {mode:4} {fmt_time(t['jbce']):>9} {fmt_time(t['per_member']):>11} "
              f"{fmt_time(t['optax']):>9}  {ratio:.2f}")  # fmt: skip
        results.append({"case": case, "mode": mode, "seconds": t, "per_member_over_jbce": ratio})
    if args.json:
        args.json.write_text(json.dumps({"members": args.members, "rows": rows,
                                         "classes": classes, "elements": elements,
                                         "results": results}, indent=1))  # fmt: skip
    return results


if __name__ == "__main__":
    main()
