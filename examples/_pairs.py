"""Retrieval data for examples/retrieval.py: (docstring, function body) pairs of the stdlib.

Every function and method with a docstring in the running Python's standard library (its
modules and packages, without their tests and the generated ``encodings`` codecs) is a pair:
the *query* is its docstring, the *document* its body without the docstring (and without the
``def`` line, so the function's name is not given away). The split is by top-level module or
package, chosen by a hash of its name as in :func:`examples._data.stdlib_corpus`, so test
pairs come from modules never seen in training (about 6,800 pairs with Python 3.11).

Also here: the word-piece tokenizer both towers share, the BM25 (``bm25s``) and random
baselines, and the retrieval metrics (recall@k, MRR).
"""

from __future__ import annotations

import ast
import re
import sysconfig
import zlib
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np

PAD, UNK = 0, 1


class Pairs(NamedTuple):
    """Pairs of one split: docstrings, bodies, their modules and ids (equal docstrings share
    one: ``"Return self."`` documents several functions)."""

    queries: list[str]
    documents: list[str]
    modules: list[str]
    ids: np.ndarray  # int32 [n]


def _function_pairs(source: str) -> list[tuple[str, str]]:
    try:
        tree = ast.parse(source)
    except SyntaxError:  # a module of another Python version's syntax (lib2to3 tests, say)
        return []
    lines = source.splitlines()
    out = []
    for node in _definitions(tree):
        doc = ast.get_docstring(node)
        if not doc or len(node.body) < 2:  # a docstring and at least one statement
            continue
        first, last = node.body[1].lineno, node.body[-1].end_lineno
        body = "\n".join(lines[first - 1 : last])
        out.append((" ".join(doc.split()), body))
    return out


def _definitions(node):
    """The function definitions among ``node``'s statements, nested ones too (the
    statements only: ``ast.walk`` would visit every expression, 10x slower)."""
    for field in ("body", "orelse", "finalbody", "handlers"):
        for child in getattr(node, field, ()):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                yield child
            if isinstance(child, ast.stmt | ast.excepthandler):
                yield from _definitions(child)


def _pairs(files: list[Path], root: Path) -> Pairs:
    queries, documents, modules = [], [], []
    for path in files:
        for doc, body in _function_pairs(path.read_text(encoding="utf-8", errors="replace")):
            queries.append(doc)
            documents.append(body)
            modules.append(str(path.relative_to(root)))
    _, ids = np.unique(np.asarray(queries, dtype=object), return_inverse=True)
    return Pairs(queries, documents, modules, ids.astype(np.int32))


_SKIP = {"site-packages", "test", "tests", "idle_test", "__pycache__", "encodings"}


def stdlib_pairs(test_percent: int = 10) -> tuple[Pairs, Pairs]:
    """(train, test) pairs, the test pairs from the top-level modules and packages whose
    name hashes (``zlib.crc32 % 100``) below ``test_percent``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py")
        if not any(part in _SKIP or part.startswith("test_") for part in p.relative_to(root).parts)
    )  # fmt: skip
    top = [p.relative_to(root).parts[0].removesuffix(".py") for p in files]
    held_out = [zlib.crc32(t.encode()) % 100 < test_percent for t in top]
    train = [p for p, h in zip(files, held_out, strict=True) if not h]
    test = [p for p, h in zip(files, held_out, strict=True) if h]
    return _pairs(train, root), _pairs(test, root)


# --- word pieces: identifiers split at underscores, case changes and digits ---------------------
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")


def words(text: str) -> list[str]:
    """Lower-case word pieces: ``"getAttr_by_name2"`` -> ``["get", "attr", "by", "name", "2"]``."""
    return [w.lower() for w in _WORD.findall(text)]


class Vocabulary(NamedTuple):
    index: dict[str, int]

    def encode(self, texts: list[str], length: int) -> np.ndarray:
        """``[len(texts), length]`` int32 ids (first ``length`` words, padded with 0)."""
        out = np.zeros((len(texts), length), np.int32)
        for i, text in enumerate(texts):
            ids = [self.index.get(w, UNK) for w in words(text)[:length]]
            out[i, : len(ids)] = ids
        return out


def vocabulary(texts: list[str], size: int, min_count: int = 2) -> Vocabulary:
    """The ``size - 2`` most frequent word pieces of ``texts`` (seen ``min_count`` times)."""
    counts = Counter(w for t in texts for w in words(t))
    common = [w for w, c in counts.most_common(size - 2) if c >= min_count]
    return Vocabulary({w: i + 2 for i, w in enumerate(common)})


# --- metrics and baselines ----------------------------------------------------------------------
def retrieval_metrics(scores: np.ndarray, ids: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
    """Recall@k and MRR of ``scores`` ``[queries, candidates]`` (higher is better); candidate
    ``j`` is right for query ``i`` when ``ids[j] == ids[i]`` (any of them counts)."""
    relevant = ids[:, None] == ids[None, :]
    best = np.max(np.where(relevant, scores, -np.inf), axis=1, keepdims=True)
    rank = 1 + np.sum((scores > best) & ~relevant, axis=1)  # ties count in the query's favour
    out = {f"R@{k}": float(np.mean(rank <= k)) for k in ks}
    out["MRR"] = float(np.mean(1.0 / rank))
    return out


def random_metrics(ids: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
    """The expected metrics of a random ranking (each query's relevant set as in
    :func:`retrieval_metrics`): recall@k and MRR of the first relevant item among ``n``."""
    n = len(ids)
    sizes = np.sum(ids[:, None] == ids[None, :], axis=1)
    ranks = np.arange(1, n + 1)
    out = {}
    for k in ks:
        out[f"R@{k}"] = float(np.mean([1 - _none_in_first(n, r, k) for r in sizes]))
    # P(first relevant at rank t) = P(none in t - 1) - P(none in t)
    mrr = [np.sum((_none_in_first(n, r, ranks - 1) - _none_in_first(n, r, ranks)) / ranks)
           for r in np.unique(sizes)]  # fmt: skip
    per_size = dict(zip(np.unique(sizes), mrr, strict=True))
    out["MRR"] = float(np.mean([per_size[r] for r in sizes]))
    return out


def _none_in_first(n, r, t):
    """P(no relevant item among the first ``t`` of ``n`` shuffled, ``r`` of them relevant)."""
    t = np.asarray(t)
    p = np.ones(t.shape)
    for i in range(r):
        p = p * np.clip((n - t - i) / (n - i), 0, None)
    return p


def bm25_scores(queries: list[str], documents: list[str]) -> np.ndarray:
    """``[queries, documents]`` Okapi BM25 scores (``bm25s``, k1 = 1.5, b = 0.75) over the
    same word pieces as the model's."""
    import bm25s

    index = bm25s.BM25(method="robertson")
    index.index([words(d) for d in documents], show_progress=False)
    return np.stack([index.get_scores(words(q)) for q in queries])
