"""The conformance matrix: every public loss x implementation x derivative x edge input x dtype
x hyperparameter kind, against the float64 references of :mod:`tests.reference`.

The harness is a handful of tables; ``tests/test_matrix.py`` runs them:

* :data:`KINDS`: the input layouts (the arrays a loss takes, at small fixed shapes, which of
  them have a batch axis or a class axis) and, per layout, the **edge inputs** as data of the
  same shapes (so that every edge reuses one compiled check);
* :data:`EDGES`: the edge names and what they exercise;
* :data:`IMPLEMENTATIONS`: how a loss is run (materialised one- or two-pass, the fused
  losses' XLA tiles at several chunk sizes, Pallas interpreted, vocabulary-parallel and
  batch-sharded under ``vmap`` and under ``shard_map``, micro-batched with ``normalizer``);
* :data:`DERIVATIVES`: value, reverse gradient, JVP, ``jacfwd``, ``jacrev`` of the gradient,
  forward-over-reverse HVP;
* :data:`DTYPES`: float32, bfloat16 made inside the jit, float64;
* :data:`HYPERS` and :data:`HYPER_KINDS`: every hyperparameter's range and test values, and
  the ways a user passes one (Python number, NumPy scalar, jax scalar, traced, vmapped);
* :data:`LOSSES`: **one row per public loss**: its layout, differentiable inputs, whether it
  offers forward mode, its reductions, hyperparameters, data settings and implementations.
  A new loss joins the matrix by one row here and one ``ref_<name>`` in the references.
* :data:`KNOWN_DEFECTS`: the cases that fail on today's library, as ``fnmatch`` patterns of
  case ids with one-line reasons; the tests mark them ``xfail(strict=True)``, so a fix makes
  its case XPASS and fail until its entry is deleted.

A case id is ``loss-implementation-derivative-dtype-edge-setting``. :func:`covered` says which
cases run deterministically; ``hypothesis`` draws from the rest (``test_drawn_cases``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import math
import re
import zlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jbce
from tests import reference

BF16 = jnp.bfloat16
N = 8  # rows (tokens) of every input; the batch-sharded checks split them over 2 and 8
NORMALIZER = 5.0  # the micro-batches' denominator of "mean"
NONNEGATIVE_ULPS = 4  # a loss documented >= 0 "to rounding" may be below 0 by a few ulps of 1


# ==============================================================================================
# jbce's implementation names and private switches: each written once, here
# ==============================================================================================

ONE_PASS, TWO_PASS, PALLAS = "one_pass", "two_pass", "pallas"
# Forward mode of a custom_vjp loss: JAX's own TypeError, which jbce leaves as JAX writes it
# (docs/gradients.md, "Forward mode").
REVERSE_ONLY_ERROR = "forward-mode autodiff"
# A second derivative of a loss or implementation with first-order derivatives only: jbce's
# own TypeError naming it (docs/gradients.md), in reverse and forward-over-reverse mode alike.
FIRST_ORDER_ONLY_ERROR = "has first-order derivatives only"


def pallas_interpret(platform: str, block_sizes: tuple[int, ...]):
    """Runs ``implementation="pallas"`` with ``platform``'s kernels in Pallas interpret mode
    (the harness's one use of a private jbce module)."""
    from jbce._linear.pallas import interpret

    return interpret(platform, block_sizes=block_sizes)


# ==============================================================================================
# Input layouts and their edge inputs
# ==============================================================================================


def _rng(*key) -> np.random.Generator:
    """A generator seeded by ``key`` (the same in every process)."""
    return np.random.default_rng([zlib.crc32(str(k).encode()) for k in key])


def _onehot(k, c):
    return np.eye(k)[c]


def _ensure_a_class(where):
    """Every row keeps at least one class (so that a row is only dropped on purpose)."""
    where[np.arange(len(where)), np.argmax(~where.any(-1, keepdims=True) | where, -1)] = True
    return where


def _random_where(shape, rng):
    return _ensure_a_class(rng.uniform(size=shape) > 0.3)


@dataclasses.dataclass(frozen=True)
class Kind:
    """An input layout: ``make()`` -> the base arrays (float64 / int); ``low_precision``: the
    logits-like inputs (the first is the primary one), made bf16 inside the jit in the
    bfloat16 dtype (labels, weights and options stay float32); the arrays with a batch axis
    (0) and the class axis of each array; the size of the reduced axis (for tolerances); the
    edge inputs (functions editing a copy of the base arrays, adding ``where`` when they
    mask) and the edges that change the shapes."""

    name: str
    make: Callable[[], dict]
    low_precision: tuple[str, ...]
    batch: tuple[str, ...]
    classes: dict[str, int]
    size: int
    edges: dict[str, Callable[[dict], None]]
    shapes: dict[str, Callable[[], dict]] = dataclasses.field(default_factory=dict)
    # edge -> how much the loss amplifies the inputs' rounding there (the tolerance's factor)
    conditioning: dict[str, float] = dataclasses.field(default_factory=dict)


# --- softmax logits with soft labels [N, 5] -----------------------------------------------------
KS = 5


def _soft_make(k=KS, n=N):
    r = _rng("soft", k, n)
    y = r.dirichlet(np.ones(k), size=n)
    if n:
        y[0] = _onehot(k, 1 % k)
    return {"logits": r.normal(size=(n, k)) * 2, "labels": y, "weights": r.uniform(0.5, 2, n)}


def _renormalise(y, row, zero):
    y[row, zero] = 0.0
    y[row] /= y[row].sum()


def _soft_large(a):
    x, y = a["logits"], a["labels"]
    x[0, :2] = [1e30, -1e30]
    y[0] = _onehot(KS, 0)  # the +1e30 class: loss 0
    x[1, 0] = -1e30
    y[1] = _onehot(KS, 0)  # the -1e30 class: loss 1e30
    x[2, 3] = 1e30  # a soft row: the other classes' terms are ~1e30


def _soft_inf(a):
    x, y = a["logits"], a["labels"]
    x[0, 1] = np.inf  # NaN row
    x[1, [0, 2]] = -np.inf
    _renormalise(y, 1, [0, 2])


def _soft_neg_inf_classes(a):
    x, y = a["logits"], a["labels"]
    for row, cols in ((0, [0, 2]), (1, [4]), (3, [1, 2, 3]), (4, [0])):
        x[row, cols] = -np.inf
        _renormalise(y, row, cols)


def _soft_target_on_neg_inf(a):
    a["logits"][0, 1] = -np.inf  # the one-hot target's class: +inf


def _soft_masked(a, rng=None, key="logits"):
    rng = rng or _rng("soft-masked")
    where = _random_where(a[key].shape, rng)
    where[0] = True
    where[0, np.argmax(a["labels"][0])] = False  # the target's class masked: dropped
    where[0, 3] = True
    a["where"] = where


def _all_neg_inf_row(key="logits", row=2):
    def edit(a):
        a[key][row] = -np.inf

    return edit


def _all_masked_row(a, key="logits"):
    where = np.ones(a[key].shape, bool)
    where[3] = False
    a["where"] = where


def _soft_confident(a):
    x, y = a["logits"], a["labels"]
    x[0] = [0.0] + [-200.0] * (KS - 1)  # p rounds to 1 in float32
    y[0] = _onehot(KS, 0)
    x[1] = [-200.0, 0.0] + [-200.0] * (KS - 2)
    y[1] = _onehot(KS, 1)
    x[2] = [30.0] + [0.0] * (KS - 1)
    y[2] = _onehot(KS, 0)


def _nan(key="logits", at=(5, 1)):
    def edit(a):
        a[key][at] = np.nan

    return edit


def _soft_matching(a):
    x = a["logits"]
    e = np.exp(x - x.max(-1, keepdims=True))
    a["labels"] = e / e.sum(-1, keepdims=True)


def _one_class(make):
    """One class, the first row's logit -inf (a row without classes)."""

    def build():
        a = make(k=1)
        a["logits"][0] = -np.inf
        return a

    return build


SOFT = Kind(
    "soft", _soft_make, ("logits",), ("logits", "labels", "weights"),
    {"logits": 1, "labels": 1}, KS,
    {
        "large": _soft_large, "inf": _soft_inf, "neg_inf_classes": _soft_neg_inf_classes,
        "target_on_neg_inf": _soft_target_on_neg_inf, "masked_classes": _soft_masked,
        "all_neg_inf_row": _all_neg_inf_row(), "all_masked_row": _all_masked_row,
        "confident": _soft_confident, "nan": _nan(), "matching": _soft_matching,
    },
    {"one_class": _one_class(_soft_make), "empty": lambda: _soft_make(n=0)},
)  # fmt: skip


# --- softmax logits with integer labels [N, 8] --------------------------------------------------
KI = 8
IGNORED_ROW = 6


def _int_make(k=KI, n=N):
    r = _rng("int", k, n)
    lab = r.integers(0, k, size=n)
    if n > IGNORED_ROW:
        lab[IGNORED_ROW] = -100
    return {"logits": r.normal(size=(n, k)) * 2, "labels": lab, "weights": r.uniform(0.5, 2, n)}


def _labels(a):
    return a["labels"]


def _off_label(a, row, shift=1):
    return (max(_labels(a)[row], 0) + shift) % a["logits"].shape[-1]


def _int_large(a):
    x, lab = a["logits"], _labels(a)
    x[0, :] = -1e30
    x[0, lab[0]] = 1e30  # loss 0
    x[1, lab[1]] = -1e30  # loss 1e30
    x[2, _off_label(a, 2)] = 1e30  # loss 1e30


def _int_inf(a):
    x = a["logits"]
    x[0, _off_label(a, 0)] = np.inf  # NaN row
    x[1, [_off_label(a, 1, 1), _off_label(a, 1, 2)]] = -np.inf


def _int_neg_inf_classes(a):
    x = a["logits"]
    for row, shifts in ((0, (1, 3)), (1, (2,)), (3, (1, 2, 4, 5)), (4, (7,))):
        x[row, [_off_label(a, row, s) for s in shifts]] = -np.inf


def _int_label_on_neg_inf(a):
    a["logits"][0, _labels(a)[0]] = -np.inf  # +inf


def _int_masked(a, rng=None):
    where = _random_where(a["logits"].shape, rng or _rng("int-masked"))
    where[0] = True
    where[0, _labels(a)[0]] = False  # the label's class masked
    a["where"] = where


def _int_confident(a):
    x, lab = a["logits"], _labels(a)
    for row in (0, 1):
        x[row] = -200.0
        x[row, lab[row]] = 0.0  # p rounds to 1 in float32
    x[2] = 0.0
    x[2, lab[2]] = 30.0


INT = Kind(
    "int", _int_make, ("logits",), ("logits", "labels", "weights"),
    {"logits": 1, "class_weights": 0}, KI,
    {
        "large": _int_large, "inf": _int_inf, "neg_inf_classes": _int_neg_inf_classes,
        "target_on_neg_inf": _int_label_on_neg_inf, "masked_classes": _int_masked,
        "all_neg_inf_row": _all_neg_inf_row(), "all_masked_row": _all_masked_row,
        "confident": _int_confident, "nan": lambda a: _nan(at=(5, _off_label(a, 5)))(a),
    },
    {"one_class": _one_class(_int_make), "empty": lambda: _int_make(n=0)},
)  # fmt: skip


# --- log-probabilities with integer labels (nll_loss) [N, 5] ------------------------------------
def _log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _logp_make(n=N):
    a = _int_make(k=KS, n=n)
    return {"log_probs": _log_softmax(a.pop("logits")), **a}


def _logp_neg_inf(a):
    lp, lab = a["log_probs"], a["labels"]
    lp[0, (lab[0] + 1) % KS] = -np.inf  # not read
    lp[1, lab[1]] = -np.inf  # +inf


def _logp_nan(a):
    lp, lab = a["log_probs"], a["labels"]
    lp[4, (lab[4] + 1) % KS] = np.nan  # not read: finite
    lp[5, lab[5]] = np.nan


def _logp_large(a):
    a["log_probs"][0, a["labels"][0]] = -1e30


def _rows_masked(a):
    where = np.ones(N, bool)
    where[[1, 3]] = False
    a["where"] = where


LOG_PROBS = Kind(
    "log_probs", _logp_make, ("log_probs",), ("log_probs", "labels", "weights"), {},
    KS,
    {"large": _logp_large, "neg_inf_classes": _logp_neg_inf, "nan": _logp_nan,
     "masked_rows": _rows_masked},
    {"empty": lambda: _logp_make(n=0)},
)  # fmt: skip


# --- elementwise logits and probabilities [N, 3] ------------------------------------------------
KB = 3


def _binary_make(key="logits", n=N):
    r = _rng("binary", key, n)
    y = r.uniform(size=(n, KB))
    y[: n // 2] = np.round(y[: n // 2])
    x = r.normal(size=(n, KB)) * 2 if key == "logits" else r.uniform(0.05, 0.95, size=(n, KB))
    return {key: x, "labels": y, "weights": r.uniform(0.5, 2, size=(n, KB))}


def _binary_large(a):
    a["logits"][0] = [1e30, -1e30, 1e30]
    a["labels"][0] = [1.0, 0.0, 0.0]  # 0, 0, 1e30


def _binary_inf(a):
    a["logits"][1] = [np.inf, -np.inf, -np.inf]
    a["labels"][1] = [1.0, 0.0, 0.5]  # 0, 0, +inf


def _binary_confident(a):  # optax's test_extreme_logits_finite_gradients
    a["logits"][0] = [100.0, -100.0, 75.0]
    a["labels"][0] = [0.9, 0.1, 0.8]
    a["logits"][1] = [-75.0, 50.0, -50.0]
    a["labels"][1] = [0.2, 1.0, 0.0]


def _binary_masked(a):
    a["where"] = _rng("binary-masked").uniform(size=(N, KB)) > 0.3


def _probs_zero_one(a):
    a["probs"][0] = [0.0, 1.0, 0.0]
    a["labels"][0] = [0.0, 1.0, 1.0]  # the last clamped at -100
    a["probs"][1] = [1.0, 0.0, 0.5]
    a["labels"][1] = [0.5, 0.5, 0.5]


BINARY = Kind(
    "binary", _binary_make, ("logits",), ("logits", "labels", "weights"),
    {}, 1,
    {"large": _binary_large, "inf": _binary_inf, "confident": _binary_confident,
     "masked_classes": _binary_masked, "nan": _nan()},
    {"empty": lambda: _binary_make(n=0)},
)  # fmt: skip
BINARY_PROBS = Kind(
    "binary_probs", functools.partial(_binary_make, "probs"), ("probs",),
    ("probs", "labels", "weights"), {}, 1,
    {"zero_one": _probs_zero_one, "masked_classes": _binary_masked, "nan": _nan("probs")},
    {"empty": lambda: _binary_make("probs", n=0)},
)  # fmt: skip


# --- probabilities with soft labels (categorical CE) and alone (entropy) [N, 5] -----------------
def _probs_make(n=N, labels=True):
    a = _soft_make(n=n)
    x = a.pop("logits")
    e = np.exp(x - x.max(-1, keepdims=True))
    a["probs"] = e / e.sum(-1, keepdims=True)
    return a if labels else {"probs": a["probs"]}


def _probs_zero(a):
    p = a["probs"]
    p[0, 2] = 0.0
    if "labels" in a:
        _renormalise(a["labels"], 0, [2])
        p[1, 3] = 0.0  # under a positive label: log clamped at -100
    p[2] = _onehot(KS, 4)


def _probs_nan(a):
    row = 5
    a["probs"][row, np.argmax(a["labels"][row]) if "labels" in a else 1] = np.nan


PROBS_SOFT = Kind(
    "probs_soft", _probs_make, ("probs",), ("probs", "labels", "weights"),
    {}, KS,
    {"zero": _probs_zero,
     "masked_classes": lambda a: _soft_masked(a, _rng("probs-masked"), "probs"),
     "all_masked_row": functools.partial(_all_masked_row, key="probs"), "nan": _probs_nan},
    {"empty": lambda: _probs_make(n=0)},
)  # fmt: skip


PROBS = Kind(
    "probs", functools.partial(_probs_make, labels=False), ("probs",), ("probs",), {}, KS,
    {"zero": _probs_zero, "nan": _probs_nan},
    {"empty": lambda: _probs_make(n=0, labels=False)},
)  # fmt: skip


# --- a student's and a teacher's logits (JSD) [N, 5] --------------------------------------------
def _two_make(n=N):
    r = _rng("two", n)
    return {
        "logits": r.normal(size=(n, KS)) * 2,
        "teacher_logits": r.normal(size=(n, KS)) * 2,
        "weights": r.uniform(0.5, 2, n),
    }


def _two_large(a):
    x, t = a["logits"], a["teacher_logits"]
    x[0, 0] = t[0, 0] = 1e30
    x[1, 1] = -1e30
    t[2, 3] = -1e30


def _two_inf(a):
    a["logits"][0, 1] = np.inf
    a["logits"][1, [0, 3]] = a["teacher_logits"][1, [0, 3]] = -np.inf


def _two_neg_inf_classes(a):
    x, t = a["logits"], a["teacher_logits"]
    x[0, 1] = t[0, 1] = -np.inf  # in both: drops out
    x[1, [2, 3]] = t[1, [2, 3]] = -np.inf
    x[3, 0] = -np.inf  # the student's only: M keeps the teacher's mass (KL(P||Q) = inf)
    t[4, 2] = -np.inf  # the teacher's only


def _two_confident(a):
    x, t = a["logits"], a["teacher_logits"]
    x[0] = t[0] = [0.0] + [-200.0] * (KS - 1)
    x[1] = [0.0] + [-200.0] * (KS - 1)
    t[1] = [-200.0, 0.0] + [-200.0] * (KS - 2)
    x[2] = [30.0, 0, 0, 0, 0]


def _two_all_neg_inf_row(a):
    a["logits"][2] = a["teacher_logits"][2] = -np.inf


def _two_masked(a):
    where = _random_where(a["logits"].shape, _rng("two-masked"))
    a["where"] = where


TWO = Kind(
    "two", _two_make, ("logits", "teacher_logits"),
    ("logits", "teacher_logits", "weights"), {}, KS,
    {"large": _two_large, "inf": _two_inf, "neg_inf_classes": _two_neg_inf_classes,
     "masked_classes": _two_masked, "all_neg_inf_row": _two_all_neg_inf_row,
     "all_masked_row": _all_masked_row, "confident": _two_confident, "nan": _nan(),
     "matching": lambda a: a.update(teacher_logits=a["logits"].copy())},
    {"empty": lambda: _two_make(n=0)},
    # At +-1e30 the second derivatives are differences of 1e30-sized terms that cancel to
    # ~1e24 (1e-6 of them): float32 keeps a few percent of such a difference (a bfloat16 hvp
    # entry 1.45e24 for the float64 1.15e24 of the same rounded inputs).
    conditioning={"large": 4.0},
)  # fmt: skip


# --- GAN logits [N] -----------------------------------------------------------------------------
def _gan_make(n=N, both=True):
    r = _rng("gan", n)
    a = {"fake_logits": r.normal(size=n) * 2}
    if both:
        a["real_logits"] = r.normal(size=n) * 2
    return a


def _gan_large(a):
    a["fake_logits"][0] = -1e30  # 0
    a["fake_logits"][1] = 1e30
    if "real_logits" in a:
        a["real_logits"][0] = 1e30
        a["real_logits"][1] = -1e30


def _gan_inf(a):
    a["fake_logits"][0] = -np.inf  # 0
    if "real_logits" in a:
        a["real_logits"][0] = np.inf  # 0


def _gan_nan(a):
    a["fake_logits"][5] = np.nan


GAN = Kind(
    "gan", _gan_make, ("real_logits", "fake_logits"), ("real_logits", "fake_logits"), {}, N,
    {"large": _gan_large, "inf": _gan_inf, "nan": _gan_nan},
    {"empty": lambda: _gan_make(n=0)},
)  # fmt: skip
GAN1 = Kind(
    "gan1", functools.partial(_gan_make, both=False), ("fake_logits",), ("fake_logits",), {}, N,
    {"large": _gan_large, "inf": _gan_inf, "nan": _gan_nan},
    {"empty": lambda: _gan_make(n=0, both=False)},
)  # fmt: skip


# --- the fused linear losses: hidden [N, 4] @ weight [4, 12] + bias [12] ------------------------
D, DT, V = 4, 3, 12
VOCAB_SHARDS = 4  # V / 4 = 3 classes per shard; K = 8: 2


def _linear_make(n=N, v=V, teacher=False, ignore=True):
    r = _rng("linear", n, v, teacher, ignore)
    lab = r.integers(0, v, size=n)
    lab[lab == 3] = 4  # class 3 is the one a -inf bias removes
    lab[lab == v - 1] = 0
    if ignore and n > IGNORED_ROW:
        lab[IGNORED_ROW] = -100
    a = {
        "hidden": r.normal(size=(n, D)),
        "weight": r.normal(size=(D, v)) * 0.8,
        "bias": r.normal(size=v),
        "labels": lab,
    }
    if teacher:
        a["teacher_hidden"] = r.normal(size=(n, DT))
        a["teacher_weight"] = r.normal(size=(DT, v)) * 0.8
        a["teacher_bias"] = r.normal(size=v)
    if ignore:
        a["weights"] = r.uniform(0.5, 2, n)
    return a


def _biases(a):
    return [k for k in ("bias", "teacher_bias") if k in a]


def _linear_large(a):
    for b in _biases(a):
        a[b][0], a[b][1] = 1e30, -1e30


def _linear_neg_inf_bias(a):  # class 3, and the last class: a ragged last vocabulary tile
    for b in _biases(a):
        a[b][[3, V - 1]] = -np.inf


def _linear_one_sided(a):
    a["bias"][5] = -np.inf  # the student's only


def _linear_label_on_neg_inf(a):
    a["bias"][3] = -np.inf
    a["labels"][0] = 3


def _linear_all_neg_inf(a):
    for b in _biases(a):
        a[b][:] = -np.inf


def _linear_confident(a):
    for b in _biases(a):
        a[b][:] = -200.0
        a[b][0] = 0.0
    a["labels"][np.asarray(a["labels"]) >= 0] = 0
    for h in ("hidden", "teacher_hidden"):
        if h in a:
            a[h] *= 1e-3


def _linear_one_class(**kw):
    a = _linear_make(v=1, **kw)
    a["labels"][a["labels"] > 0] = 0
    return a


LINEAR_CLASSES = {"weight": 1, "bias": 0, "class_weights": 0, "teacher_weight": 1,
                  "teacher_bias": 0}  # fmt: skip
LINEAR = Kind(
    "linear", _linear_make, ("hidden", "weight"),
    ("hidden", "labels", "weights"), LINEAR_CLASSES, V,
    {"large": _linear_large, "neg_inf_bias": _linear_neg_inf_bias,
     "target_on_neg_inf": _linear_label_on_neg_inf, "all_neg_inf_row": _linear_all_neg_inf,
     "confident": _linear_confident, "nan": _nan("hidden", (5, 0))},
    {"one_class": _linear_one_class, "empty": lambda: _linear_make(n=0)},
)  # fmt: skip
LINEAR_LOG_PROBS = Kind(
    "linear_log_probs", functools.partial(_linear_make, ignore=False),
    ("hidden", "weight"), ("hidden", "labels"), LINEAR_CLASSES, V,
    {"large": _linear_large, "neg_inf_bias": _linear_neg_inf_bias,
     "target_on_neg_inf": _linear_label_on_neg_inf, "all_neg_inf_row": _linear_all_neg_inf,
     "confident": _linear_confident, "nan": _nan("hidden", (5, 0))},
    {"one_class": functools.partial(_linear_one_class, ignore=False),
     "empty": lambda: _linear_make(n=0, ignore=False)},
)  # fmt: skip
DISTILL = Kind(
    "distill", functools.partial(_linear_make, teacher=True),
    ("hidden", "weight", "teacher_hidden", "teacher_weight"),
    ("hidden", "teacher_hidden", "labels", "weights"), LINEAR_CLASSES, V,
    {"large": _linear_large, "neg_inf_bias": _linear_neg_inf_bias,
     "one_sided_neg_inf": _linear_one_sided, "all_neg_inf_row": _linear_all_neg_inf,
     "confident": _linear_confident, "nan": _nan("hidden", (5, 0))},
    {"one_class": functools.partial(_linear_one_class, teacher=True),
     "empty": lambda: _linear_make(n=0, teacher=True)},
)  # fmt: skip


# --- two batches of embeddings, x [N, 4] and y [N, 4], with scale (and bias) ---------------------
def _contrastive_make(n=N, bias=False):
    r = _rng("contrastive", n, bias)
    x, y = r.normal(size=(2, n, D))
    a = {"x": _unit(x), "y": _unit(y), "scale": np.asarray(3.0)}
    if bias:
        a["bias"] = np.asarray(-2.0)
    return a


def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _duplicate_ids(a):
    a["ids"] = np.array([0, 1, 0, 2, 1, 3, 4, 0])  # pairs sharing a caption's id


def _near_identical(a):
    """Unit vectors 1e-3 apart at scale 100: every logit within 0.1 of 100 (or of 100 + b)."""
    r = _rng("near_identical")
    base = r.normal(size=D)
    a["x"], a["y"] = (_unit(base + 1e-3 * r.normal(size=(N, D))) for _ in range(2))
    a["scale"] = np.asarray(100.0)


def _contrastive_kind(name, bias):
    return Kind(
        name, functools.partial(_contrastive_make, bias=bias), ("x", "y"), ("x", "y", "ids"),
        {}, N, {"duplicate_ids": _duplicate_ids, "near_identical": _near_identical},
        {"one_pair": functools.partial(_contrastive_make, n=1, bias=bias),
         "empty": functools.partial(_contrastive_make, n=0, bias=bias)},
        # float32 logits near 100 are rounded to ~100 ulps of 1
        conditioning={"near_identical": 100.0},
    )  # fmt: skip


CLIP, SIGLIP = _contrastive_kind("clip", False), _contrastive_kind("siglip", True)

KINDS = {k.name: k for k in (SOFT, INT, LOG_PROBS, BINARY, BINARY_PROBS, PROBS_SOFT, PROBS,
                             TWO, GAN, GAN1, LINEAR, LINEAR_LOG_PROBS, DISTILL, CLIP,
                             SIGLIP)}  # fmt: skip

# What each edge exercises ("random" is the base data; the last two change the shapes).
EDGES = {
    "random": "normal logits, soft and one-hot labels, an ignored row",
    "large": "logits of +-1e30 (losses of 0 and of 1e30)",
    "inf": "+inf logits (NaN rows) and -inf ones",
    "neg_inf_classes": "-inf classes under zero targets",
    "target_on_neg_inf": "a positive target or the label on a -inf class (+inf)",
    "one_sided_neg_inf": "a class -inf in the student only",
    "masked_classes": "classes masked by a logits-shaped where, the target's class included",
    "masked_rows": "rows masked by a per-example where",
    "all_neg_inf_row": "a row whose every logit is -inf (excluded like a masked row)",
    "all_masked_row": "a row whose every class where masks",
    "confident": "rows whose p rounds to 1 in float32 ([0, -200, ...])",
    "nan": "NaN in one row gives NaN in that row only",
    "matching": "labels equal to the predicted distribution (KL 0)",
    "zero": "probabilities of exactly 0 (and 1)",
    "zero_one": "probabilities of exactly 0 and 1",
    "neg_inf_bias": "a -inf bias (vocabulary padding), in the last ragged vocabulary tile too",
    "duplicate_ids": "pairs sharing an id (duplicate captions: the target mass shared)",
    "near_identical": "scale 100 with embeddings 1e-3 apart (logits within 0.1 of 100)",
    "one_class": "one class (K = 1 or V = 1), with an all -inf row",
    "one_pair": "a batch of one pair",
    "empty": "no rows",
}
SHAPE_EDGES = ("one_class", "one_pair", "empty")


def edges_of(kind: Kind) -> list[str]:
    return ["random", *kind.edges, *kind.shapes]


def inputs(kind: Kind, edge: str) -> dict:
    """The base arrays of ``kind`` with ``edge`` applied (numpy; float64 and int)."""
    if edge in kind.shapes:
        return kind.shapes[edge]()
    a = {k: np.array(v) for k, v in kind.make().items()}
    if edge != "random":
        kind.edges[edge](a)
    return a


# ==============================================================================================
# Implementations
# ==============================================================================================


@dataclasses.dataclass(frozen=True)
class Implementation:
    """How a loss is run. ``options``: keywords of the jbce call; ``shard``: the axis split
    over ``shards`` shards ("vocab": the class axis, with ``axis_name``; "batch": the rows,
    with ``batch_axis_name``; 0 shards: one class per shard) under ``vmap`` or, with
    ``shard_map``, on that many devices; ``micro``: the rows split into that many
    micro-batches whose "mean" losses, with ``normalizer``, add up; ``context``: entered
    around every trace; ``dtypes``: the dtypes it takes (others raise a ValueError matching
    ``dtype_error``); ``reverse_only``: forward mode raises a TypeError."""

    doc: str
    options: dict = dataclasses.field(default_factory=dict)
    shard: str | None = None
    shards: int = 1
    shard_map: bool = False
    micro: int = 0
    context: Callable = contextlib.nullcontext
    dtypes: tuple[str, ...] = ("float32", "bfloat16", "float64")
    dtype_error: str = ""
    reverse_only: bool = False


# Block caps of the interpreted kernels: GPU (tn, tv, tk, td), TPU (tn, tv).
PALLAS_BLOCKS = {"gpu": (16, 16, 16, 16), "tpu": (8, 128)}
PALLAS_DTYPES = {"dtypes": ("float32", "bfloat16"), "dtype_error": "computes in float32"}
IMPLEMENTATIONS = {
    "materialised": Implementation("the loss as called: implementation=None, chunk_size=None"),
    "one_pass": Implementation("one variadic max/sum-exp reduction",
                               {"implementation": ONE_PASS}),
    "two_pass": Implementation("max, then the sum of exps", {"implementation": TWO_PASS}),
    "tiled_v5": Implementation("vocabulary tiles of 5: V = 12 is not a multiple",
                               {"chunk_size": 5}),
    "tiled_t3_v5": Implementation("tiles of 3 tokens (not dividing N = 8) x 5 classes",
                                  {"chunk_size": (3, 5)}),
    "pallas_gpu": Implementation(
        "the GPU (Triton) kernels in Pallas interpret mode", {"implementation": PALLAS},
        context=functools.partial(pallas_interpret, "gpu", PALLAS_BLOCKS["gpu"]),
        reverse_only=True, **PALLAS_DTYPES,
    ),
    "pallas_tpu": Implementation(
        "the TPU (Mosaic) kernels in Pallas interpret mode", {"implementation": PALLAS},
        context=functools.partial(pallas_interpret, "tpu", PALLAS_BLOCKS["tpu"]),
        reverse_only=True, **PALLAS_DTYPES,
    ),
    "vocab_vmap": Implementation("classes over 4 shards (axis_name) under vmap",
                                 shard="vocab", shards=VOCAB_SHARDS, reverse_only=True),
    "vocab_vmap_one_class": Implementation(
        "one class per shard (axis_name) under vmap, one-pass", {"implementation": ONE_PASS},
        shard="vocab", shards=0, reverse_only=True,
    ),
    "vocab_shard_map": Implementation("classes over 4 devices (axis_name) in shard_map",
                                      shard="vocab", shards=VOCAB_SHARDS, shard_map=True,
                                      reverse_only=True),
    "batch_vmap": Implementation("rows over 2 shards (batch_axis_name) under vmap",
                                 shard="batch", shards=2),
    "batch_shard_map": Implementation("rows over 8 devices (batch_axis_name) in shard_map",
                                      shard="batch", shards=8, shard_map=True),
    "micro_batch": Implementation("2 micro-batches, mean with normalizer, summed", micro=2),
}  # fmt: skip
SOFTMAX_IMPLS = ("one_pass", "two_pass")
BATCH_IMPLS = ("batch_vmap", "batch_shard_map", "micro_batch")
TILED_IMPLS = ("tiled_v5", "tiled_t3_v5")
VOCAB_IMPLS = ("vocab_vmap", "vocab_shard_map")


def _axes(kind: Kind, impl: Implementation, a: dict) -> dict[str, int]:
    """The arrays of ``a`` that ``impl`` splits, and along which axis."""
    if impl.shard == "vocab":
        axes = {k: ax for k, ax in kind.classes.items() if k in a}
        if "where" in a:
            axes["where"] = a["where"].ndim - 1
        return axes
    return {k: 0 for k in (*kind.batch, "where") if k in a}


def _to_shards(x, axis, shards):
    x = jnp.asarray(x)
    shape = x.shape[:axis] + (shards, x.shape[axis] // shards) + x.shape[axis + 1 :]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def run_loss(row, impl: Implementation, a: dict, reduction):
    """``jbce.<row>`` of the inputs ``a`` through ``impl``, as the whole batch's result."""
    fn = getattr(jbce, row.name)

    def call(arrays, **extra):
        kw = {**impl.options, **extra}
        if reduction is not None:
            kw["reduction"] = reduction
        return fn(**arrays, **kw)

    per_row = reduction == "none" or (reduction is None and row.per_row)
    if impl.micro:
        n = a[row.kind.batch[0]].shape[0]
        m = n // impl.micro
        axes = _axes(row.kind, IMPLEMENTATIONS["batch_vmap"], a)
        parts = [{k: v[i * m : (i + 1) * m] if k in axes else v for k, v in a.items()}
                 for i in range(impl.micro)]  # fmt: skip
        extra = {"normalizer": NORMALIZER} if reduction == "mean" else {}
        outs = [call(part, **extra) for part in parts]
        return jax.tree.map(lambda *o: jnp.concatenate(o) if per_row else sum(o), *outs)
    if impl.shard is None:
        return call(a)
    axes = _axes(row.kind, impl, a)
    name = "shard"
    extra = {"axis_name" if impl.shard == "vocab" else "batch_axis_name": name}
    shards = (
        impl.shards
        or a[row.kind.low_precision[0]].shape[row.kind.classes[row.kind.low_precision[0]]]
    )
    if impl.shard_map:
        mesh = Mesh(np.array(jax.devices()[:shards]), (name,))
        in_specs = {
            k: P(*[name if i == axes[k] else None for i in range(np.ndim(v))]) if k in axes
            else P()
            for k, v in a.items()
        }  # fmt: skip
        out = P(name) if per_row and impl.shard == "batch" else P()
        out_specs = (out, out) if row.name == "linear_log_probs" else out
        f = jax.shard_map(lambda s: call(s, **extra), mesh=mesh, in_specs=(in_specs,),
                          out_specs=out_specs)  # fmt: skip
        return f(a)
    split = {k: _to_shards(v, axes[k], shards) if k in axes else v for k, v in a.items()}
    in_axes = {k: 0 if k in axes else None for k in a}
    out = jax.vmap(lambda s: call(s, **extra), in_axes=(in_axes,), axis_name=name)(split)
    if per_row and impl.shard == "batch":
        return jax.tree.map(lambda o: o.reshape((-1,) + o.shape[2:]), out)
    # Every shard holds the whole result: their mean has the whole result's derivatives.
    return jax.tree.map(lambda o: jnp.mean(o, axis=0), out)


# ==============================================================================================
# Derivatives
# ==============================================================================================


@dataclasses.dataclass(frozen=True)
class Derivative:
    """``apply(objective, vector, d, rest, t)``: a derivative of the scalar ``objective`` (the
    "mean" loss, or a fixed weighted sum of the outputs) or of ``vector`` (the per-row
    losses) with respect to the differentiable inputs ``d`` (the other inputs ``rest``),
    ``t`` a tangent like ``d``. ``order``: 0, 1 or 2; ``forward``: uses forward mode."""

    doc: str
    order: int
    forward: bool
    apply: Callable | None = None
    reference_as: str | None = None  # the same quantity, computed so in the reference


def _bind(f, rest):
    return lambda d: f({**rest, **d})


DERIVATIVES = {
    "value": Derivative("every reduction's value", 0, False),
    "grad": Derivative("jax.grad", 1, False, lambda obj, vec, d, rest, t: jax.grad(
        _bind(obj, rest))(d)),
    "jvp": Derivative("jax.jvp of the per-row losses", 1, True, lambda obj, vec, d, rest, t:
                      jax.jvp(_bind(vec, rest), (d,), (t,))),
    # The reference's gradient by reverse mode: forward mode of plain jnp multiplies a zero
    # tangent by a NaN partial (0 * NaN) and spreads one NaN row to every entry.
    "jacfwd": Derivative("jax.jacfwd (the gradient by forward mode)", 1, True,
                         lambda obj, vec, d, rest, t: jax.jacfwd(_bind(obj, rest))(d), "grad"),
    "hessian": Derivative("jax.jacrev(jax.grad(f))", 2, False, lambda obj, vec, d, rest, t:
                          jax.jacrev(jax.grad(_bind(obj, rest)))(d)),
    "hvp": Derivative("jax.jvp(jax.grad(f)): forward-over-reverse", 2, True,
                      lambda obj, vec, d, rest, t: jax.jvp(jax.grad(_bind(obj, rest)), (d,),
                                                           (t,))[1]),
}  # fmt: skip
# Allowed error growth per derivative order (conditioning of softmax derivatives).
ORDER_GROWTH = 4.0


# ==============================================================================================
# Dtypes
# ==============================================================================================


@dataclasses.dataclass(frozen=True)
class DType:
    """``storage``: the dtype the inputs are fed in; ``compute``: the dtype the loss sees,
    made from the float inputs inside the jitted check (bf16: ``x.astype(bfloat16)`` in the
    same jit as the loss)."""

    storage: type
    compute: type

    def cast(self, a: dict, kind: Kind) -> dict:
        if self.compute == self.storage:
            return a
        return {k: v.astype(self.compute) if k in kind.low_precision else v for k, v in a.items()}

    def rounded(self, a: dict, kind: Kind) -> dict:
        """``a`` as the loss sees it, in float64 (the reference's inputs)."""
        out = {}
        for k, v in a.items():
            v = np.asarray(v)
            if np.issubdtype(v.dtype, np.floating):
                v = v.astype(self.storage)
                if k in kind.low_precision:
                    v = v.astype(self.compute)
                v = v.astype(np.float64)
            out[k] = v
        return out


DTYPES = {
    "float32": DType(np.float32, np.float32),
    "bfloat16": DType(np.float32, BF16),
    "float64": DType(np.float64, np.float64),
}


# ==============================================================================================
# Hyperparameters and the ways to pass one
# ==============================================================================================


@dataclasses.dataclass(frozen=True)
class Hyper:
    """A hyperparameter's range ``[lo, hi]`` (open ends by ``open_lo``/``open_hi``), a
    value with a fraction and an integral value (for integer kinds)."""

    lo: float
    hi: float
    value: float
    integral: int
    open_lo: bool = False
    open_hi: bool = False

    def bad(self) -> list[float]:
        """Python numbers outside the range."""
        out = []
        if math.isfinite(self.lo):
            out.append(self.lo if self.open_lo else self.lo - 0.5)
        if math.isfinite(self.hi):
            out.append(self.hi if self.open_hi else self.hi + 0.5)
        return out


INF = math.inf
HYPERS = {
    "label_smoothing": Hyper(0, 1, 0.1, 0),
    "z_loss": Hyper(0, INF, 1e-3, 0),
    "logit_softcap": Hyper(0, INF, 5.0, 5, open_lo=True),
    "alpha": Hyper(0, 1, 0.25, 1),  # sigmoid focal: a weight of the positives
    "alpha_per_class": Hyper(0, INF, 0.25, 2),  # softmax focal: any weight >= 0
    "gamma": Hyper(0, INF, 0.5, 2),
    "epsilon": Hyper(-1, INF, 0.5, 2),
    "beta": Hyper(0, 1, 0.3, 1),
    "temperature": Hyper(0, INF, 0.7, 2, open_lo=True),
    "pos_weight": Hyper(-INF, INF, 2.5, 2),
    "normalizer": Hyper(0, INF, NORMALIZER, int(NORMALIZER)),
    "scale": Hyper(0, INF, 3.0, 2),
    "bias": Hyper(-INF, INF, -2.0, -2),
}
# How a user passes a hyperparameter: (how a value becomes the argument, integral values only).
HYPER_KINDS = {
    "python": (lambda v: v, False),
    "python_int": (int, True),
    "numpy_float32": (np.float32, False),
    "numpy_float32_zero": (lambda v: np.float32(0.0), False),
    "numpy_float64": (np.float64, False),
    "numpy_int64": (np.int64, True),
    "jax_scalar": (lambda v: jnp.asarray(v, jnp.float32), False),
    "traced": (None, False),  # a jit argument
    "vmapped": (None, False),  # vmap over three values
}


# ==============================================================================================
# The losses: one row each
# ==============================================================================================


@dataclasses.dataclass(frozen=True)
class Loss:
    """One public loss ``jbce.<name>``, checked against ``reference.ref_<name>``.

    ``kind``: its input layout; ``diff``: the inputs differentiated (those present);
    ``reductions``: its ``reduction=`` values (none: it has no ``reduction``); ``hypers``:
    its hyperparameters (``HYPERS`` entries, by argument name); ``settings``: named values
    of its options, passed as data (0-d arrays are traced hyperparameters); ``impls``: its
    implementations; ``forward``: it offers forward mode; ``nonnegative``: documented >= 0;
    ``per_row``: without a reduction, one output per row; ``reference_options(dtype)``:
    keywords of the reference that depend on the dtype computed in."""

    name: str
    kind: Kind
    diff: tuple[str, ...]
    reductions: tuple[str, ...]
    hypers: dict[str, Hyper]
    settings: dict[str, dict]
    impls: tuple[str, ...]
    forward: bool = True
    nonnegative: bool = True
    per_row: bool = True
    reference_options: Callable[[str], dict] = lambda dtype: {}


def _hypers(*names, **renamed):
    return {**{n: HYPERS[n] for n in names}, **{n: HYPERS[h] for n, h in renamed.items()}}


R3, R4 = ("none", "sum", "mean"), ("none", "sum", "mean", "batchmean")
CW = {k: np.linspace(0.5, 2.0, k) for k in (KS, KI, V)}  # class weights
ALPHA = {k: np.linspace(0.2, 1.2, k) for k in (KS, KI)}  # per-class alpha
JSD_SETTINGS = {"beta0.5": {"beta": 0.5, "temperature": 1.0},
                "beta0": {"beta": 0.0, "temperature": 2.0},
                "beta1": {"beta": 1.0, "temperature": 0.5}}  # fmt: skip
CE_OPTIONS = {"label_smoothing": 0.1, "z_loss": 1e-3, "logit_softcap": 5.0}
MATERIALISED = ("materialised", *BATCH_IMPLS)
# The contrastive losses: one tile (the default chunk), tiles not dividing B = 8, the ring
# (batch_axis_name) on 8 devices in shard_map, as documented (not under vmap: the backward
# pass's collectives need a bound axis; no micro-batches: the negatives are the batch's).
CONTRASTIVE_IMPLS = ("materialised", *TILED_IMPLS, "batch_shard_map")

LOSSES = {
    row.name: row
    for row in (
        Loss("sigmoid_binary_cross_entropy", BINARY, ("logits", "labels"), R3,
             _hypers("label_smoothing", "pos_weight", "normalizer"),
             {"plain": {}, "options": {"label_smoothing": 0.1, "pos_weight": 2.0}},
             MATERIALISED),
        Loss("binary_cross_entropy", BINARY_PROBS, ("probs", "labels"), R3,
             _hypers("label_smoothing", "normalizer"),
             {"plain": {}, "smoothed": {"label_smoothing": 0.1}}, MATERIALISED),
        Loss("sigmoid_focal_loss", BINARY, ("logits", "labels"), R3,
             _hypers("alpha", "gamma", "normalizer"),
             {"gamma0.5": {"gamma": 0.5, "alpha": 0.25}, "gamma2": {"gamma": 2.0, "alpha": 0.25}},
             MATERIALISED),
        Loss("softmax_cross_entropy", SOFT, ("logits", "labels"), R3,
             _hypers("label_smoothing", "normalizer"),
             {"plain": {}, "smoothed": {"label_smoothing": 0.1}},
             ("materialised", *SOFTMAX_IMPLS, *BATCH_IMPLS)),
        Loss("softmax_cross_entropy_with_integer_labels", INT, ("logits", "class_weights"), R3,
             _hypers("label_smoothing", "z_loss", "logit_softcap", "normalizer"),
             {"plain": {}, "options": {"class_weights": CW[KI], **CE_OPTIONS}},
             ("materialised", *SOFTMAX_IMPLS, *VOCAB_IMPLS, "vocab_vmap_one_class",
              *BATCH_IMPLS)),
        Loss("softmax_focal_loss", SOFT, ("logits", "labels"), R3,
             _hypers("gamma", "normalizer", alpha="alpha_per_class"),
             {"gamma0.5": {"gamma": 0.5, "alpha": ALPHA[KS]},
              "gamma2": {"gamma": 2.0, "alpha": ALPHA[KS]}}, MATERIALISED),
        Loss("softmax_focal_loss_with_integer_labels", INT, ("logits",), R3,
             _hypers("gamma", "normalizer", alpha="alpha_per_class"),
             {"gamma0.5": {"gamma": 0.5, "alpha": ALPHA[KI], "class_weights": CW[KI]},
              "gamma2": {"gamma": 2.0, "alpha": ALPHA[KI], "class_weights": CW[KI]}},
             MATERIALISED),
        Loss("poly_loss_cross_entropy", SOFT, ("logits", "labels"), R3,
             _hypers("epsilon", "normalizer"),
             {"eps2": {"epsilon": 2.0}, "eps-1": {"epsilon": -1.0}}, MATERIALISED),
        Loss("nll_loss", LOG_PROBS, ("log_probs",), R3, _hypers("normalizer"),
             {"plain": {}, "class_weights": {"class_weights": CW[KS]}}, MATERIALISED),
        Loss("categorical_cross_entropy", PROBS_SOFT, ("probs", "labels"), R3,
             _hypers("label_smoothing", "normalizer"),
             {"plain": {}, "smoothed": {"label_smoothing": 0.1}}, MATERIALISED),
        Loss("entropy", PROBS, ("probs",), (), {}, {"plain": {}}, ("materialised",),
             reference_options=lambda dtype: {"tiny": float(np.finfo(
                 np.float64 if dtype == "float64" else np.float32).tiny)}),
        Loss("kl_divergence", SOFT, ("logits",), R4, _hypers("normalizer"), {"plain": {}},
             MATERIALISED),
        Loss("jensen_shannon_divergence", TWO, ("logits", "teacher_logits"), R4,
             _hypers("beta", "temperature", "normalizer"), JSD_SETTINGS, MATERIALISED),
        Loss("discriminator_loss", GAN, ("real_logits", "fake_logits"), (), {}, {"plain": {}},
             ("materialised", "batch_vmap", "batch_shard_map"), per_row=False),
        Loss("generator_loss", GAN1, ("fake_logits",), (), {}, {"plain": {}},
             ("materialised", "batch_vmap", "batch_shard_map"), per_row=False),
        Loss("linear_softmax_cross_entropy", LINEAR, ("hidden", "weight", "bias"), R3,
             _hypers("label_smoothing", "z_loss", "logit_softcap", "normalizer"),
             {"plain": {}, "options": {"class_weights": CW[V], **CE_OPTIONS}},
             ("materialised", *TILED_IMPLS, "pallas_gpu", "pallas_tpu", *VOCAB_IMPLS,
              *BATCH_IMPLS), forward=False),
        Loss("linear_log_probs", LINEAR_LOG_PROBS, ("hidden", "weight", "bias"), (),
             _hypers("temperature"), {"t1": {"temperature": 1.0}, "t0.7": {"temperature": 0.7}},
             ("materialised", *TILED_IMPLS, *VOCAB_IMPLS), forward=False, nonnegative=False),
        Loss("linear_distillation_loss", DISTILL, ("hidden", "weight", "bias", "teacher_hidden"),
             R3, _hypers("beta", "temperature", "normalizer"), JSD_SETTINGS,
             ("materialised", *TILED_IMPLS, *VOCAB_IMPLS, *BATCH_IMPLS), forward=False),
        Loss("clip_loss", CLIP, ("x", "y", "scale"), R3, _hypers("scale"), {"plain": {}},
             CONTRASTIVE_IMPLS, forward=False),
        Loss("siglip_loss", SIGLIP, ("x", "y", "scale", "bias"), R3, _hypers("scale", "bias"),
             {"plain": {}}, CONTRASTIVE_IMPLS, forward=False),
    )
}  # fmt: skip


# ==============================================================================================
# The cases
# ==============================================================================================

VALUE_ONLY_EDGES = ("target_on_neg_inf",)  # infinite losses: no derivative to compare
# Where a loss documented >= 0 is negative by its defined semantics.
NOT_NONNEGATIVE = {
    ("softmax_cross_entropy_with_integer_labels", "masked_classes"):
        "optax's behaviour for a masked label: lse over the other classes minus x_y",
    ("kl_divergence", "masked_classes"):
        "the labels of masked classes are dropped, the rest is not renormalised",
}  # fmt: skip
# The derivatives of the deterministic part on the materialised loss (first setting): a
# loss offering forward mode also takes the JVP; second order by reverse-over-reverse.
FIRST_SETTING_DERIVATIVES = ("value", "grad", "jvp", "hessian")
# Cases always run (fnmatch patterns of case ids) beyond :func:`covered`'s rule: the
# second derivatives of the vocabulary-parallel CE and of linear_log_probs' ragged tiles.
ALWAYS = (
    "softmax_cross_entropy_with_integer_labels-vocab_*-hessian-float32-random-plain",
    "linear_log_probs-tiled_v5-hessian-float32-neg_inf_bias-t1",
)


@functools.cache
def _masked(kind: str, edge: str) -> bool:
    return edge not in SHAPE_EDGES and "where" in inputs(KINDS[kind], edge)


@functools.cache
def covered(loss: str, impl: str, deriv: str, dtype: str, edge: str, setting: str) -> bool:
    """The deterministic part of the product (float32); ``hypothesis`` draws from the rest.

    Each line below is one compiled check per input structure (the edges of one structure
    share it): the materialised loss in its first setting on every edge with the value,
    gradient, JVP and Hessian; in its other settings the value and gradient on the edges
    without masks; every other implementation in the first setting with the value and
    gradient on the edges without masks (batch-sharded under vmap: with them too, for the
    masks' global count), but of the batch-split implementations one per loss, in turn
    (:func:`_batch_impl`); the shape edges (one class, no rows) on the materialised loss and
    the one-pass softmax; and the cases of :data:`ALWAYS`. Every loss x implementation x
    edge is in it; the other derivatives, settings and dtypes are drawn.
    """
    if dtype != "float32" or (edge in VALUE_ONLY_EDGES and deriv != "value"):
        return False
    if any(fnmatch.fnmatchcase(case_id(loss, impl, deriv, dtype, edge, setting), p)
           for p in ALWAYS):  # fmt: skip
        return True
    first = setting == next(iter(LOSSES[loss].settings))
    if edge in SHAPE_EDGES:
        return first and deriv in ("value", "grad") and impl in ("materialised", ONE_PASS)
    masked = _masked(LOSSES[loss].kind.name, edge)
    if impl == "materialised" and first:
        return deriv in FIRST_SETTING_DERIVATIVES
    if impl in BATCH_IMPLS and impl != _batch_impl(loss):
        return False
    if masked and impl != "batch_vmap":
        return False
    return deriv in ("value", "grad") and (first or impl == "materialised")


def _batch_impl(loss: str) -> str:
    """The one batch-split implementation of ``loss`` in the deterministic part (in turn)."""
    impls = [i for i in LOSSES[loss].impls if i in BATCH_IMPLS]
    return impls[list(LOSSES).index(loss) % len(impls)] if impls else ""


def case_id(loss, impl, deriv, dtype, edge, setting) -> str:
    return "-".join((loss, impl, deriv, dtype, edge, setting))


def all_cases():
    """Every case of the product, (loss, impl, deriv, dtype, edge, setting), in the order
    that shares compiled checks (a loss, implementation, dtype and setting at a time)."""
    for loss, row in LOSSES.items():
        for impl in row.impls:
            for dtype in DTYPES:
                for setting in row.settings:
                    for edge in edges_of(row.kind):
                        if _splittable(impl, edge):
                            for deriv in DERIVATIVES:
                                yield loss, impl, deriv, dtype, edge, setting


def _splittable(impl: str, edge: str) -> bool:
    """A class axis of one cannot be split over several vocabulary shards (one class per
    shard is its own implementation, ``vocab_vmap_one_class``)."""
    im = IMPLEMENTATIONS[impl]
    return not (edge == "one_class" and im.shard == "vocab" and im.shards > 1)


def known_defect(cid: str) -> str | None:
    """The reason of the first ``KNOWN_DEFECTS`` pattern matching the case id, if any."""
    for pattern, reason in KNOWN_DEFECTS.items():
        if fnmatch.fnmatchcase(cid, pattern):
            return reason
    return None


def case_inputs(loss: str, edge: str, setting: str, dtype: str):
    """(inputs in the storage dtype, tangents of the differentiable ones, float64 inputs as
    the loss sees them)."""
    row, dt = LOSSES[loss], DTYPES[dtype]
    a = inputs(row.kind, edge)
    k = a["weight"].shape[1] if "weight" in a else a[row.kind.low_precision[0]].shape[-1]
    # per-class options follow the edge's class count
    a.update({name: np.asarray(v)[:k] if np.ndim(v) else np.asarray(v)
              for name, v in row.settings[setting].items()})  # fmt: skip
    a = {k: v.astype(dt.storage) if np.issubdtype(v.dtype, np.floating) else v
         for k, v in a.items()}  # fmt: skip
    a = {k: v.astype(np.int32) if np.issubdtype(v.dtype, np.integer) else v for k, v in a.items()}
    rng = _rng("tangents", loss, edge)
    t = {k: rng.normal(size=np.shape(a[k])).astype(dt.storage) for k in row.diff if k in a}
    return a, t, dt.rounded(a, row.kind)


def _cotangent(o):
    return jnp.linspace(0.5, 1.5, o.size, dtype=o.dtype).reshape(o.shape)


def _objective_and_vector(row: Loss, loss_fn):
    def objective(a):
        if row.reductions:
            return loss_fn(a, "mean")
        out = loss_fn(a, None)
        return sum(jnp.sum(o * _cotangent(o)) for o in jax.tree.leaves(out))

    def vector(a):
        return loss_fn(a, "none" if row.reductions else None)

    return objective, vector


def _reductions(row: Loss, impl: Implementation):
    if not row.reductions:
        return (None,)
    return tuple(r for r in row.reductions if not (impl.micro and r == "batchmean"))


def _derive(row, deriv, loss_fn, a, t, reductions):
    if deriv == "value":
        return {str(r): loss_fn(a, r) for r in reductions}
    objective, vector = _objective_and_vector(row, loss_fn)
    d = {k: v for k, v in a.items() if k in t}
    rest = {k: v for k, v in a.items() if k not in t}
    return DERIVATIVES[deriv].apply(objective, vector, d, rest, t)


def _reverse_only(row: Loss, im: Implementation) -> bool:
    return not row.forward or im.reverse_only


def _offered(loss: str, impl: str, deriv: str, dtype: str) -> bool:
    row, im = LOSSES[loss], IMPLEMENTATIONS[impl]
    return dtype in im.dtypes and not (DERIVATIVES[deriv].forward and _reverse_only(row, im))


# The losses whose shard_map value also runs un-jitted, as a user may call it (op by op on
# 8 devices: slow, so on the base inputs of the first setting only; the rest run jitted).
EAGER_SHARD_MAP = ("linear_distillation_loss",)


def _eager(loss: str, impl: str, deriv: str, edge: str, setting: str) -> bool:
    first = setting == next(iter(LOSSES[loss].settings))
    base = deriv == "value" and edge == "random" and first
    return IMPLEMENTATIONS[impl].shard_map and loss in EAGER_SHARD_MAP and base


def _together(loss: str, impl: str, deriv: str, dtype: str, edge: str, setting: str):
    """The derivatives computed by one compiled function with ``deriv``: all those covered
    and offered for inputs of this structure."""
    if _eager(loss, impl, deriv, edge, setting):
        return (deriv,)
    base = "random" if edge in VALUE_ONLY_EDGES else edge  # same structure, same function
    derivs = tuple(
        d for d in DERIVATIVES
        if covered(loss, impl, d, dtype, base, setting) and _offered(loss, impl, d, dtype)
    )  # fmt: skip
    return derivs if deriv in derivs else (deriv,)


@functools.cache
def check_function(loss: str, impl: str, dtype: str, derivs: tuple[str, ...],
                   eager: bool = False) -> Callable:  # fmt: skip
    """f(inputs, tangents) -> {derivative: jbce's result} for ``loss`` through ``impl`` in
    ``dtype``, jitted unless ``eager``."""
    row, im, dt = LOSSES[loss], IMPLEMENTATIONS[impl], DTYPES[dtype]

    def loss_fn(a, reduction):
        return run_loss(row, im, dt.cast(a, row.kind), reduction)

    def f(a, t):
        return {d: _derive(row, d, loss_fn, a, t, _reductions(row, im)) for d in derivs}

    return f if eager else jax.jit(f)


# Failures depend on the structure of the inputs (shapes, dtypes), not on their values (JAX
# raises while tracing): remembered per structure, so that each edge does not trace again.
_FAILED: dict[tuple, Exception] = {}


@contextlib.contextmanager
def partitioner_for(impl: str, edge: str):
    """JAX's GSPMD partitioner for ``shard_map`` on the empty batch, its default (Shardy)
    elsewhere. Shardy fails to lower a ``shard_map`` body whose shards are zero-size (JAX
    lowers zero-size values to constants, so the body reads none of its operands): "'func.call'
    op expected at least one operand of @xla.sdy.manual_computation_body to be produced by a
    xla.sdy.GlobalToLocalShape CustomCallOp", with jax 0.10.2 and without jbce too, e.g.
    ``psum(sum(logaddexp(x, 0) - x * y))`` on ``[0, K]`` inputs (docs/devices.md)."""
    if not (IMPLEMENTATIONS[impl].shard_map and edge == "empty"):
        yield
        return
    before = jax.config.jax_use_shardy_partitioner
    jax.config.update("jax_use_shardy_partitioner", False)
    try:
        yield
    finally:
        jax.config.update("jax_use_shardy_partitioner", before)


def _structure(a: dict) -> tuple:
    return tuple((k, np.shape(v), str(np.asarray(v).dtype)) for k, v in a.items())


@functools.lru_cache(maxsize=512)
def jbce_results(loss: str, impl: str, dtype: str, edge: str, setting: str, derivs: tuple,
                 eager: bool = False):  # fmt: skip
    """{derivative: result, or the exception it raised} of one case's inputs: the
    derivatives computed together, or, where that fails, the first-order reverse ones
    together and each other one alone."""
    a, t, _ = case_inputs(loss, edge, setting, dtype)
    key = (loss, impl, dtype, derivs, eager, _structure(a))
    if key not in _FAILED:
        try:
            with IMPLEMENTATIONS[impl].context(), partitioner_for(impl, edge):
                return jax.device_get(check_function(loss, impl, dtype, derivs, eager)(a, t))
        except Exception as e:  # noqa: BLE001 - attributed below, or by the case
            _FAILED[key] = e
    if len(derivs) == 1:
        return {derivs[0]: _FAILED[key]}
    safe = tuple(d for d in derivs if DERIVATIVES[d].order <= 1 and not DERIVATIVES[d].forward)
    together = len(safe) > 1 and safe != derivs
    groups = ([safe] if together else []) + [(d,) for d in derivs if not (together and d in safe)]
    out = {}
    for group in groups:
        out.update(jbce_results(loss, impl, dtype, edge, setting, group, eager))
    return out


@functools.cache
def _reference_function(loss, normalized: bool, reductions: tuple, options: tuple, derivs):
    row = LOSSES[loss]
    ref = getattr(reference, f"ref_{loss}")

    def loss_fn(a, reduction):
        kw = dict(options) if reduction is None else {**dict(options), "reduction": reduction}
        if reduction == "mean" and normalized:
            kw["normalizer"] = NORMALIZER
        return ref(**a, **kw, xp=jnp)

    def f(a, t):
        objective, _ = _objective_and_vector(row, loss_fn)
        results = {}
        for d in derivs:
            how = DERIVATIVES[d].reference_as or d
            results[d] = _derive(row, how, loss_fn, a, t, reductions)
        return objective(a), results

    return jax.jit(f)


def reference_results(loss: str, impl: str, dtype: str, edge: str, setting: str, derivs):
    """(the objective's value, {derivative: the float64 reference's result}) of a case."""
    im = IMPLEMENTATIONS[impl]
    base = "random" if edge in VALUE_ONLY_EDGES else edge
    # Every implementation's deterministic derivatives of these inputs, in one compiled
    # reference (the edges of one structure share it too).
    derivs = set(derivs)
    for other in LOSSES[loss].impls:
        if bool(IMPLEMENTATIONS[other].micro) == bool(im.micro):
            derivs.update(_together(loss, other, "value", dtype, base, setting))
    ordered = tuple(d for d in DERIVATIVES if d in derivs)
    return _reference_results(loss, bool(im.micro), dtype, edge, setting, ordered)


@functools.lru_cache(maxsize=512)
def _reference_results(loss: str, micro: bool, dtype: str, edge: str, setting: str, derivs):
    row = LOSSES[loss]
    _, t, a64 = case_inputs(loss, edge, setting, dtype)
    options = tuple(sorted(row.reference_options(dtype).items()))
    reductions = _reductions(row, IMPLEMENTATIONS["micro_batch" if micro else "materialised"])
    f = _reference_function(loss, micro, reductions, options, derivs)
    return jax.device_get(f(a64, _float64(t)))


def _float64(t: dict) -> dict:
    return {k: np.asarray(v, np.float64) for k, v in t.items()}


def _devices_needed(im: Implementation) -> int:
    return im.shards if im.shard_map else 1


def compare(got, want, dtype: str, size: int, order: int, what: str = "", factor=1.0) -> None:
    """Every leaf of ``got`` equals the float64 ``want`` rounded to ``got``'s dtype, to the
    dtype's tolerance (grown by :data:`ORDER_GROWTH` per derivative order, and by ``factor``
    where the inputs are ill-conditioned); NaNs and infinities in the same places."""
    tol = reference.tolerance(DTYPES[dtype].compute, size) * ORDER_GROWTH**order * factor
    g_leaves, g_tree = jax.tree_util.tree_flatten_with_path(got)
    w_leaves, w_tree = jax.tree_util.tree_flatten(want)
    assert len(g_leaves) == len(w_leaves), f"{what}: structure {g_tree} != {w_tree}"
    for (path, g), w in zip(g_leaves, w_leaves, strict=True):
        g = np.asarray(g)
        w = np.asarray(np.asarray(w, np.float64).astype(g.dtype), np.float64)
        name = f"{what}{jax.tree_util.keystr(path)}"
        assert g.shape == w.shape, f"{name}: shape {g.shape} != {w.shape}"
        g = g.astype(np.float64)
        same = (g == w) | (np.isnan(g) & np.isnan(w))
        close = same | (np.abs(g - w) <= tol + tol * np.abs(w))
        if not np.all(close):
            i = np.unravel_index(np.argmax(~close), g.shape) if g.ndim else ()
            raise AssertionError(
                f"{name}: {np.sum(~close)} of {g.size} entries differ beyond {tol:.2g}; "
                f"at {list(map(int, i))}: got {g[i]!r}, want {w[i]!r}"
            )


def run_case(loss: str, impl: str, deriv: str, dtype: str, edge: str, setting: str) -> None:
    """Runs one case of the matrix and asserts it (pytest skips what cannot run here)."""
    import pytest

    row, im, de = LOSSES[loss], IMPLEMENTATIONS[impl], DERIVATIVES[deriv]
    if jax.device_count() < _devices_needed(im):
        pytest.skip(f"needs {_devices_needed(im)} devices (tests/conftest.py forces 8)")
    if not _offered(loss, impl, deriv, dtype):  # a combination not offered: a clear error
        exc, match = ((ValueError, im.dtype_error) if dtype not in im.dtypes
                      else (TypeError, REVERSE_ONLY_ERROR))  # fmt: skip
        if exc is TypeError and de.order == 2:  # forward over reverse: JAX's, or jbce's own
            match = rf"{REVERSE_ONLY_ERROR}|jbce\.{loss} {FIRST_ORDER_ONLY_ERROR}"
        a, t, _ = case_inputs(loss, edge, setting, dtype)
        if exc is TypeError and edge == "empty":
            # No rows: JAX never calls the reverse-only rule, so forward mode returns the
            # empty batch's zero derivatives; either that or the error, never a number.
            with im.context(), partitioner_for(impl, edge):
                try:
                    out = check_function(loss, impl, dtype, (deriv,))(a, t)
                except TypeError as e:
                    assert re.search(match, str(e)), e
                else:
                    assert all(not np.any(np.asarray(o)) for o in jax.tree.leaves(out)), out
            return
        with im.context(), partitioner_for(impl, edge), pytest.raises(exc, match=match):
            check_function(loss, impl, dtype, (deriv,))(a, t)
        return
    derivs = _together(loss, impl, deriv, dtype, edge, setting)
    eager = _eager(loss, impl, deriv, edge, setting)
    objective, want = reference_results(loss, impl, dtype, edge, setting, derivs)
    if de.order and np.isinf(float(objective)):
        pytest.skip("the loss is infinite here: it has no derivative to compare")
    if deriv == "jacfwd" and np.isnan(float(objective)):  # 0 x NaN in every tangent
        pytest.skip("forward mode spreads a NaN loss to every entry of its gradient")
    got = jbce_results(loss, impl, dtype, edge, setting, derivs, eager)[deriv]
    if isinstance(got, Exception):
        if de.order == 2 and _reverse_only(row, im):  # not offered: it must say so clearly
            clear = isinstance(got, (TypeError, ValueError, NotImplementedError))
            assert clear and "jbce" in str(got), f"unclear error: {type(got).__name__}: {got}"
            return
        raise got
    # A value from bf16 inputs is computed (and returned) in float32: float32's tolerance, so
    # that inputs not rounded to bf16 inside the jit (excess precision) would show.
    tol_dtype = "float32" if (dtype == "bfloat16" and de.order == 0) else dtype
    factor = row.kind.conditioning.get(edge, 1.0)
    compare(got, want[deriv], tol_dtype, row.kind.size, de.order, f"{loss} {deriv}", factor)
    if deriv == "value" and row.nonnegative and (loss, edge) not in NOT_NONNEGATIVE:
        bound = -NONNEGATIVE_ULPS * float(jnp.finfo(DTYPES[dtype].compute).eps)
        for r, out in got.items():
            out = np.asarray(out, np.float64)
            assert not np.any(out < bound), f"{r}: negative {out[out < bound]}"


# ==============================================================================================
# Hyperparameter kinds, bad arguments, the gradient filter's bound
# ==============================================================================================


def hyper_cases():
    """(loss, hyperparameter, kind) for every hyperparameter of every loss."""
    for loss, row in LOSSES.items():
        for hyper, h in row.hypers.items():
            for kind in HYPER_KINDS:
                if kind == "numpy_float32_zero" and not (h.lo <= 0 and not h.open_lo):
                    continue
                yield loss, hyper, kind


# Every way of passing a hyperparameter, on these (loss, hyperparameter)s; every
# hyperparameter vmapped over three values (on its first loss); the rest drawn.
HYPER_KINDS_ON = (
    ("softmax_cross_entropy_with_integer_labels", "label_smoothing"),
    ("linear_softmax_cross_entropy", "label_smoothing"),
    ("softmax_focal_loss", "gamma"),
)


def hyper_covered(loss: str, hyper: str, kind: str) -> bool:
    """The deterministic part of :func:`hyper_cases` (see :data:`HYPER_KINDS_ON`)."""
    if (loss, hyper) in HYPER_KINDS_ON:
        return True
    first = next(lo for lo, h, _ in hyper_cases() if h == hyper)
    return kind == "vmapped" and loss == first


def run_hyper_case(loss: str, hyper: str, kind: str) -> None:
    """The loss with ``hyper`` passed as ``kind`` equals the reference at that value."""
    row, h = LOSSES[loss], LOSSES[loss].hypers[hyper]
    make, integral = HYPER_KINDS[kind]
    setting = next(iter(row.settings))
    a, _, a64 = case_inputs(loss, "random", setting, "float32")
    a.pop(hyper, None)
    a64.pop(hyper, None)
    reduction = {"reduction": "mean"} if row.reductions else {}
    fn, ref = getattr(jbce, loss), getattr(reference, f"ref_{loss}")

    def call(arrays, v):
        return fn(**arrays, **{hyper: v}, **reduction)

    values = [h.integral if integral else h.value]
    if kind == "numpy_float32_zero":
        values = [0.0]
    if kind == "traced":
        got = [jax.jit(call)(a, jnp.asarray(values[0], jnp.float32))]
    elif kind == "vmapped":
        values = [h.value, h.integral, (h.value + h.integral) / 2]
        out = jax.vmap(call, in_axes=(None, 0))(a, jnp.asarray(values, jnp.float32))
        got = [jax.tree.map(lambda o, i=i: o[i], out) for i in range(len(values))]
    else:  # passed as is into a jitted call (a Python or NumPy value stays one)
        got = [jax.jit(lambda arrays: call(arrays, make(values[0])))(a)]
    for v, g in zip(values, got, strict=True):
        v32 = float(np.float32(v))  # the value as the float32 loss sees it
        want = ref(**a64, **{hyper: v32}, **reduction)
        compare(g, want, "float32", row.kind.size, 0, f"{loss} {hyper}={v!r}")


def error_cases() -> dict[str, tuple]:
    """Bad arguments, by case id: (loss, edit of the call's keywords, exception, match)."""
    cases = {}
    for loss, row in LOSSES.items():
        first = row.kind.low_precision[0]
        if row.reductions:
            cases[f"{loss}-reduction"] = (loss, {"reduction": "bogus"}, ValueError, "reduction")
        cases[f"{loss}-integer_{first}"] = (loss, {first: "int"}, TypeError, "floating")
        second = [k for k in row.kind.batch if k != first]
        if second and row.name not in ("discriminator_loss",):
            cases[f"{loss}-shape_{second[0]}"] = (loss, {second[0]: "short"}, ValueError,
                                                  "shape")  # fmt: skip
        for hyper, h in row.hypers.items():
            for bad in h.bad():
                cases[f"{loss}-{hyper}={bad}"] = (loss, {hyper: bad}, ValueError, hyper)
        if "implementation" in _parameters(loss):
            cases[f"{loss}-implementation"] = (loss, {"implementation": "bogus"}, ValueError,
                                               "implementation")  # fmt: skip
        if "chunk_size" in _parameters(loss):
            cases[f"{loss}-chunk_size=0"] = (loss, {"chunk_size": 0}, ValueError, "chunk_size")
        if "batchmean" in row.reductions:
            cases[f"{loss}-batchmean-batch_axis_name=3"] = (
                loss, {"reduction": "batchmean", "batch_axis_name": 3}, TypeError,
                "batch_axis_name",
            )  # fmt: skip
        if "batch_axis_name" in _parameters(loss):
            cases[f"{loss}-batch_axis_name=3"] = (loss, {"batch_axis_name": 3}, TypeError,
                                                  "batch_axis_name")  # fmt: skip
    cases["linear_softmax_cross_entropy-gradient_filter_without_pallas"] = (
        "linear_softmax_cross_entropy",
        {"gradient_filter": 1e-3},
        ValueError,
        "gradient_filter",
    )
    cases["linear_softmax_cross_entropy-pallas_chunk_size"] = (
        "linear_softmax_cross_entropy", {"implementation": PALLAS, "chunk_size": 4}, ValueError,
        "chunk_size",
    )  # fmt: skip
    return cases


def _parameters(loss: str):
    import inspect

    return inspect.signature(getattr(jbce, loss)).parameters


def run_error_case(cid: str) -> None:
    import pytest

    loss, edit, exc, match = error_cases()[cid]
    a, _, _ = case_inputs(loss, "random", next(iter(LOSSES[loss].settings)), "float32")
    kw = {}
    for k, v in edit.items():
        if v == "int":
            a[k] = np.zeros(a[k].shape, np.int32)
        elif v == "short":
            a[k] = a[k][:-1]
        else:
            a.pop(k, None)
            kw[k] = v
    with pytest.raises(exc, match=match):
        getattr(jbce, loss)(**a, **kw)


# A class axis of size 0 (optax's masked tests take logits[mask], no class at all for an all
# False mask; optax's loss is then 0): jbce raises a ValueError naming the logits.
ZERO_CLASS_LOSSES = ("softmax_cross_entropy", "poly_loss_cross_entropy", "kl_divergence")


def zero_class_case(loss: str) -> None:
    """A class axis of size 0 is a clear error."""
    import pytest

    x = jnp.zeros((3, 0), jnp.float32)
    with pytest.raises(ValueError, match="logits"):
        getattr(jbce, loss)(x, x)


def gradient_filter_case(platform: str, option: str, threshold: float = 1e-4) -> None:
    """``gradient_filter``: every gradient entry it drops is below threshold x w_y x |g_n|.

    With ``hidden`` the identity, the weight's gradient is the logits' gradient. Half the
    classes sit at probability 0.5 x threshold (their tiles are skipped), the label's class
    and the rest are large; ``option`` adds class weights up to 3 or a z-loss.
    """
    blocks = PALLAS_BLOCKS[platform]
    n, v_skip = 16, blocks[1]  # the last two vocabulary blocks are skipped
    v = 4 * v_skip
    rng = _rng("gradient_filter", option)
    x = rng.normal(size=(n, v)) * 0.5
    x[:, : v - 2 * v_skip] += 8.0
    lab = rng.integers(0, v - 2 * v_skip, size=n)
    lse = np.log(np.sum(np.exp(x[:, : v - 2 * v_skip]), -1, keepdims=True))
    x[:, v - 2 * v_skip :] = lse + np.log(0.5 * threshold)  # p ~ 0.5 threshold
    cw = np.linspace(0.5, 3.0, v) if option == "class_weights" else None
    z = 1e-2 if option == "z_loss" else 0.0
    g_n = rng.uniform(0.5, 2.0, n)  # each token's cotangent (weights, reduction="sum")
    hidden = np.eye(n, dtype=np.float32)
    kw = {"class_weights": None if cw is None else jnp.asarray(cw, jnp.float32), "z_loss": z,
          "weights": jnp.asarray(g_n, jnp.float32), "reduction": "sum",
          "implementation": PALLAS}  # fmt: skip

    def grad_w(w, gradient_filter):
        f = lambda w: jbce.linear_softmax_cross_entropy(  # noqa: E731
            jnp.asarray(hidden),
            w,
            jnp.asarray(lab, jnp.int32),
            gradient_filter=gradient_filter,
            **kw,
        )
        with pallas_interpret(platform, blocks):
            return np.asarray(jax.jit(jax.grad(f))(w), np.float64)

    w = jnp.asarray(x, jnp.float32)
    full, filtered = grad_w(w, None), grad_w(w, threshold)
    dropped = np.abs(full - filtered)
    assert np.any(dropped > 0), "nothing was filtered: the check checks nothing"
    w_y = np.ones(n) if cw is None else cw[lab]
    bound = threshold * w_y * g_n
    worst = np.max(dropped / bound[:, None])
    assert worst <= 1.0 + 1e-5, f"a dropped entry is {worst:.3f} x threshold x w_y x |g_n|"


# ==============================================================================================
# Known defects: case-id patterns (fnmatch) -> why they fail today. Delete an entry when its
# case XPASSes.
# ==============================================================================================

# Why each known defect fails (none today: every defect the matrix found is fixed). A new
# one is a reason here and its case-id patterns below.
DEFECTS: dict[str, str] = {}
# Case-id patterns (fnmatch) -> the defect they show; the first match gives the reason.
KNOWN_DEFECTS: dict[str, str] = {}
