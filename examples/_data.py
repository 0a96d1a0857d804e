"""Data for the examples: scikit-learn's datasets, IDX (MNIST) files, and the stdlib as text.

Everything here returns plain NumPy arrays; the training code never sees a file or a DataFrame.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np


class Split(NamedTuple):
    """A train/test split: features float32 (n, d), labels int32 (n,)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def _stratified_split(x: np.ndarray, y: np.ndarray) -> Split:
    from sklearn.model_selection import train_test_split

    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return Split(
        x_tr.astype(np.float32),
        y_tr.astype(np.int32),
        x_te.astype(np.float32),
        y_te.astype(np.int32),
    )


def breast_cancer() -> Split:
    """scikit-learn's breast-cancer data, stratified 75/25 split (random_state=0), standardised.

    The ``StandardScaler`` is fitted on the train part only. Labels: 1 = benign, 0 = malignant.
    """
    from sklearn.datasets import load_breast_cancer
    from sklearn.preprocessing import StandardScaler

    x, y = load_breast_cancer(return_X_y=True)
    s = _stratified_split(x, y)
    scaler = StandardScaler().fit(s.x_train)
    return s._replace(
        x_train=scaler.transform(s.x_train).astype(np.float32),
        x_test=scaler.transform(s.x_test).astype(np.float32),
    )


def digits() -> Split:
    """scikit-learn's 8x8 digits, pixels scaled to [0, 1], flattened to 64 features.

    Same stratified 75/25 split (random_state=0): 1347 train and 450 test images.
    """
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return _stratified_split(x / 16.0, y)


# --------------------------------------------------------------------------------------------
# IDX files (the format MNIST ships in): magic = 0x00 0x00 <dtype code> <ndim>, then ndim
# big-endian uint32 sizes, then the data in C order, big-endian.
# --------------------------------------------------------------------------------------------

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {dt.newbyteorder(">") if dt.itemsize > 1 else dt: c for c, dt in _IDX_DTYPES.items()}


def _open(path: str | os.PathLike, mode: str):
    return gzip.open(path, mode) if str(path).endswith(".gz") else open(path, mode)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (gzip-compressed if the name ends in ``.gz``) into a NumPy array."""
    with _open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (magic bytes {raw[:4]!r})")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX data type code 0x{code:02x}")
    dtype = _IDX_DTYPES[code]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: header says shape {shape} ({expected} bytes of data), "
            f"file has {len(raw) - header} bytes after the header"
        )
    data = np.frombuffer(raw, dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Writes ``array`` as an IDX file (gzip-compressed if the name ends in ``.gz``)."""
    array = np.asarray(array)
    big = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    if big not in _IDX_CODES:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    header = bytes([0, 0, _IDX_CODES[big], array.ndim])
    header += np.asarray(array.shape, ">u4").tobytes()
    with _open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, big).tobytes())


_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def _find(directory: Path, stem: str) -> Path:
    # Accept the canonical names, the "idx3.ubyte" spelling some mirrors use, and .gz versions.
    for name in (stem, stem.replace("-idx", ".idx")):
        for suffix in ("", ".gz"):
            if (directory / (name + suffix)).exists():
                return directory / (name + suffix)
    raise FileNotFoundError(f"{directory}: no {stem}[.gz] (expected the four MNIST IDX files)")


def mnist(directory: str | os.PathLike) -> Split:
    """MNIST from the four standard IDX files in ``directory``; pixels in [0, 1], flattened."""
    directory = Path(directory)
    arrays = {k: read_idx(_find(directory, stem)) for k, stem in _MNIST_FILES.items()}
    for part in ("train", "test"):
        x, y = arrays[f"x_{part}"], arrays[f"y_{part}"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"MNIST {part}: images {x.shape} and labels {y.shape} do not match")
    return Split(
        *(
            (a.reshape(len(a), -1) / 255.0).astype(np.float32)
            if k[0] == "x"
            else a.astype(np.int32)
            for k, a in arrays.items()
        )
    )


def batches(n: int, batch_size: int, steps: int, seed: int) -> Iterator[np.ndarray]:
    """Index arrays for ``steps`` minibatches: reshuffled epochs, deterministic per ``seed``."""
    rng = np.random.default_rng(seed)
    batch_size = min(batch_size, n)
    order = np.empty(0, np.int64)
    for _ in range(steps):
        if len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(n)])
        yield order[:batch_size]
        order = order[batch_size:]


# --------------------------------------------------------------------------------------------
# Text every machine has: the Python standard library's own source files, and a byte-level BPE
# vocabulary trained on them with the `tokenizers` package.
# --------------------------------------------------------------------------------------------

END_OF_TEXT = "<|endoftext|>"


class Corpus(NamedTuple):
    """Source files split by file: names (relative to ``root``) and their text."""

    root: Path
    train_names: list[str]
    train_texts: list[str]
    val_names: list[str]
    val_texts: list[str]


def stdlib_corpus(val_percent: int = 10) -> Corpus:
    """The top-level ``*.py`` modules of the running Python's standard library, split by file.

    Files are sorted by name (a deterministic list) and a file is held out for validation when
    ``zlib.crc32(name) % 100 < val_percent``: each file's side of the split depends on its name
    alone, so a module that one Python version adds or drops does not move the others.
    """
    import sysconfig
    import zlib

    root = Path(sysconfig.get_paths()["stdlib"])
    names = sorted(p.name for p in root.glob("*.py"))
    if not names:
        raise FileNotFoundError(f"no *.py files in the standard library directory {root}")
    train, val = ([], []), ([], [])
    for name in names:
        text = (root / name).read_text(encoding="utf-8", errors="replace")
        part = val if zlib.crc32(name.encode()) % 100 < val_percent else train
        part[0].append(name)
        part[1].append(text)
    if not val[0] or not train[0]:
        raise ValueError(f"val_percent={val_percent} leaves an empty split of {len(names)} files")
    return Corpus(root, train[0], train[1], val[0], val[1])


def train_bpe(texts: list[str], vocab_size: int):
    """A byte-level BPE ``tokenizers.Tokenizer`` (GPT-2 style) trained on ``texts``.

    Every byte is in the initial alphabet, so any text encodes (no unknown token) and decodes
    back exactly. Token 0 is ``<|endoftext|>``, which separates files in the token stream.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[END_OF_TEXT],
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def token_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """All ``texts`` encoded and concatenated, each followed by ``<|endoftext|>``; int32."""
    eot = tokenizer.token_to_id(END_OF_TEXT)
    ids = [np.asarray(e.ids + [eot], np.int32) for e in tokenizer.encode_batch(texts)]
    return np.concatenate(ids)


def windows(stream: np.ndarray, context: int) -> np.ndarray:
    """Non-overlapping training windows ``[n, context + 1]``: inputs ``w[:, :-1]``, targets
    ``w[:, 1:]``. Window ``i`` starts at ``i * context``, so every token is a target once."""
    n = (len(stream) - 1) // context
    if n < 1:
        raise ValueError(f"{len(stream)} tokens make no window of context {context} + 1")
    idx = np.arange(n)[:, None] * context + np.arange(context + 1)[None, :]
    return stream[idx]


def cached_stdlib_tokens(vocab_size: int, cache: Path | None, val_percent: int = 10):
    """``(tokenizer, train_stream, val_stream, corpus, cache_hit)`` for :func:`stdlib_corpus`.

    The tokenizer is trained on the train files only. With a ``cache`` directory, the tokenizer
    and both token streams are stored under a key that hashes the Python version, the
    ``tokenizers`` version, ``vocab_size``, the split and every file's name and text, so a
    second run skips the few seconds of BPE training and encoding; a changed file retrains.
    """
    import hashlib
    import sys

    import tokenizers
    from tokenizers import Tokenizer

    corpus = stdlib_corpus(val_percent)
    h = hashlib.sha256(f"{sys.version}|{tokenizers.__version__}|{vocab_size}".encode())
    for part, names, texts in (
        ("train", corpus.train_names, corpus.train_texts),
        ("val", corpus.val_names, corpus.val_texts),
    ):
        for name, text in zip(names, texts):
            h.update(f"|{part}:{name}:".encode() + text.encode("utf-8", "replace"))
    key = h.hexdigest()[:16]
    if cache is not None:
        tok_path, arr_path = cache / f"bpe-{key}.json", cache / f"tokens-{key}.npz"
        if tok_path.exists() and arr_path.exists():
            with np.load(arr_path) as arrays:
                train, val = arrays["train"], arrays["val"]
            return Tokenizer.from_file(str(tok_path)), train, val, corpus, True
    tokenizer = train_bpe(corpus.train_texts, vocab_size)
    train = token_stream(tokenizer, corpus.train_texts)
    val = token_stream(tokenizer, corpus.val_texts)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(tok_path))
        np.savez(arr_path, train=train, val=val)
    return tokenizer, train, val, corpus, False
