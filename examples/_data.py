"""Data for the examples: scikit-learn's bundled datasets and an IDX (MNIST) reader/writer.

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
