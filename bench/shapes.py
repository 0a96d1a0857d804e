"""The one table of named benchmark shapes, shared by ``bench/`` and the tests.

Each :class:`Shape` names a loss family and its dimensions, with tags:

- ``"quick"``: the smoke run (``python -m bench --quick``, ``tests/test_bench.py``);
  small enough that tests may also check jbce against optax on them.
- ``"full"``: the default benchmark run (every shape in the table).
- ``"target"``: the shapes that issue 5's speed targets are stated for.
"""

from __future__ import annotations

import dataclasses

BINARY = "binary"  # sigmoid BCE: logits (N,), float labels (N,)
SOFTMAX_INT = "softmax_int"  # softmax CE: logits (N, K), integer labels (N,)
SOFTMAX_SOFT = "softmax_soft"  # softmax CE: logits (N, K), label distributions (N, K)
NLL = "nll"  # negative log-likelihood: log-probabilities (N, K), integer labels (N,)
FOCAL_SOFT = "focal_soft"  # softmax focal loss: logits (N, K), label distributions (N, K)
KINDS = (BINARY, SOFTMAX_INT, SOFTMAX_SOFT, NLL, FOCAL_SOFT)
INTEGER_LABELS = (SOFTMAX_INT, NLL)  # kinds whose labels are class indices


@dataclasses.dataclass(frozen=True)
class Shape:
    """A named benchmark shape: ``kind`` and ``dims`` (``(N,)`` or ``(N, K)``) plus tags."""

    name: str
    kind: str
    dims: tuple[int, ...]
    tags: frozenset[str]

    @property
    def size(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n


def _s(name: str, kind: str, dims: tuple[int, ...], *tags: str) -> Shape:
    return Shape(name, kind, dims, frozenset(("full", *tags)))


SHAPES: tuple[Shape, ...] = (
    _s("bce_2^10", BINARY, (2**10,), "quick"),
    _s("bce_2^14", BINARY, (2**14,)),
    _s("bce_2^20", BINARY, (2**20,)),
    _s("bce_2^24", BINARY, (2**24,), "target"),
    _s("ce_int_256x1000", SOFTMAX_INT, (256, 1000), "quick"),
    _s("ce_int_1024x8192", SOFTMAX_INT, (1024, 8192)),
    _s("ce_int_4096x32768", SOFTMAX_INT, (4096, 32768), "target"),
    _s("ce_soft_256x1000", SOFTMAX_SOFT, (256, 1000), "quick"),
    _s("ce_soft_1024x8192", SOFTMAX_SOFT, (1024, 8192)),
    _s("ce_soft_4096x32768", SOFTMAX_SOFT, (4096, 32768), "target"),
    _s("nll_256x1000", NLL, (256, 1000), "quick"),
    _s("nll_4096x32768", NLL, (4096, 32768)),
    _s("focal_soft_256x1000", FOCAL_SOFT, (256, 1000), "quick"),
    _s("focal_soft_4096x32768", FOCAL_SOFT, (4096, 32768)),
)

DTYPES = ("float32", "bfloat16")
MODES = ("fwd", "vag")  # forward of the mean loss; value_and_grad w.r.t. the logits


def shapes(tag: str = "full") -> tuple[Shape, ...]:
    """The shapes carrying ``tag``, in table order."""
    return tuple(s for s in SHAPES if tag in s.tags)


def by_name(name: str) -> Shape:
    for s in SHAPES:
        if s.name == name:
            return s
    raise KeyError(f"no benchmark shape named {name!r}; known: {[s.name for s in SHAPES]}")
