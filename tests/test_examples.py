"""Smoke tests for examples/: each example runs a few steps end to end, plus the IDX reader.

The examples run in subprocesses exactly as a user starts them (``python examples/x.py`` and
``python -m examples.x``), with tiny step counts, so the whole file takes seconds.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("optax")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from examples import _data  # noqa: E402

pytestmark = pytest.mark.no_x64

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_example(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > 1000, f"{path} is suspiciously small ({len(data)} bytes)"


def test_logistic_regression_trains_and_writes_metrics_probs_and_curve(tmp_path):
    out = tmp_path / "lr"
    stdout = run_example(
        "examples/logistic_regression.py",
        *("--steps", "30", "--newton-steps", "8", "--no-progress", "--out", str(out)),
    )
    assert "scikit-learn LogisticRegression()" in stdout

    m = json.loads((out / "metrics.json").read_text())
    bc = m["breast_cancer"]
    assert bc["n_test"] == 143 and bc["l2"] == pytest.approx(1.0 / bc["n_train"])
    for fit in ("optax", "newton", "sklearn"):
        assert 0.5 < bc[fit]["accuracy"] <= 1.0
        assert 0.0 < bc[fit]["log_loss"] < np.log(2)
    assert 0.0 < m["digits"]["optax"]["accuracy"] <= 1.0
    assert set(m["goals"]) >= {"optax_log_loss_within_5pct", "newton_accuracy_within_1pt"}

    h = m["history"]
    assert len(h["optax_loss"]) == 30 and h["optax_loss"][-1] < h["optax_loss"][0]
    assert len(h["digits_loss"]) == 30 and h["digits_loss"][-1] < h["digits_loss"][0]
    # Newton from zero: the objective never increases, and 8 steps reach scikit-learn's optimum.
    assert np.all(np.diff(h["newton_loss"]) <= 1e-6)
    assert h["newton_loss"][-1] == pytest.approx(bc["sklearn"]["train_objective"], rel=1e-3)

    probs = np.load(out / "test_probs.npy")
    assert probs.shape == (143,) and probs.dtype == np.float32
    assert np.all((probs >= 0) & (probs <= 1))
    assert_png(out / "loss_curve.png")


def test_gan_trains_and_writes_samples_grid_losses_and_metrics(tmp_path):
    out = tmp_path / "gan"
    run_example(
        "-m",
        "examples.gan",
        *("--steps", "40", "--classifier-steps", "40", "--samples", "1000"),
        *("--no-progress", "--out", str(out)),
    )
    samples = np.load(out / "samples.npy")
    assert samples.shape == (1000, 8, 8) and samples.dtype == np.float32
    assert samples.min() >= 0.0 and samples.max() <= 1.0

    m = json.loads((out / "metrics.json").read_text())
    assert m["n_train"] == 1347 and m["n_test"] == 450
    assert len(m["class_coverage"]) == 10 and sum(m["class_coverage"]) == pytest.approx(1.0)
    assert 1.0 <= m["generated_score"] <= 10.0 and 1.0 <= m["real_score"] <= 10.0
    assert set(m["goals"]) == {
        "classifier_accuracy_ge_95pct",
        "score_ge_0.8x_real",
        "every_class_ge_3pct",
    }
    h = m["history"]
    assert len(h["d_loss"]) == len(h["g_loss"]) == 40
    assert np.all(np.isfinite(h["d_loss"])) and np.all(np.isfinite(h["g_loss"]))
    # The discriminator starts near chance (2 log 2 = 1.39 for BCE on real + fake) and learns
    # to tell the untrained generator's output apart within a few steps.
    assert h["d_loss"][0] > 1.2
    assert min(h["d_loss"][:10]) < h["d_loss"][0] - 0.3
    assert np.mean(h["classifier_loss"][-10:]) < h["classifier_loss"][0]
    assert_png(out / "samples.png")
    assert_png(out / "losses.png")


def test_examples_main_lists_its_options(capsys):
    from examples.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--out" in out and "runs" in out and "--seed" in out


def test_newton_step_matches_the_closed_form_hessian():
    # For mean BCE + l2/2 ||w||^2 the Hessian is X1^T diag(p (1 - p)) X1 / n + l2 (on w only),
    # with X1 = [X, 1]. The example's step gets it by reverse-over-reverse through jbce's
    # custom_vjp; one step from w must equal the closed-form Newton step.
    import jax.numpy as jnp
    from flax import nnx

    from examples import _models, _train
    from examples.logistic_regression import binary_loss

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype(np.float32)
    y = (rng.random(64) < 0.5).astype(np.float32)
    l2 = 0.05
    model = _models.Linear(3, 1, rngs=nnx.Rngs(0))
    model.dense.kernel[...] = jnp.asarray([[0.3], [-0.2], [0.1]], jnp.float32)
    graphdef, params = nnx.split(model)
    new_params, metrics = _train.newton_step(graphdef, binary_loss(l2))(
        params, {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    )

    w = np.array([0.3, -0.2, 0.1, 0.0])  # kernel, then bias
    x1 = np.concatenate([x, np.ones((64, 1), np.float32)], 1).astype(np.float64)
    p = 1 / (1 + np.exp(-x1 @ w))
    reg = np.diag([l2, l2, l2, 0.0])
    grad = x1.T @ (p - y) / 64 + reg @ w
    hess = x1.T @ (x1 * (p * (1 - p))[:, None]) / 64 + reg
    expected = w - np.linalg.solve(hess, grad)
    got = nnx.merge(graphdef, new_params)
    np.testing.assert_allclose(np.asarray(got.dense.kernel[...])[:, 0], expected[:3], atol=1e-5)
    np.testing.assert_allclose(np.asarray(got.dense.bias[...]), expected[3:], atol=1e-5)
    assert float(metrics["grad_norm"]) == pytest.approx(np.linalg.norm(grad), rel=1e-5)


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    "dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64], ids=str
)
def test_idx_round_trip(tmp_path, suffix, dtype):
    rng = np.random.default_rng(0)
    array = (rng.normal(size=(5, 3, 4)) * 50).astype(dtype)
    path = tmp_path / f"a.idx{suffix}"
    _data.write_idx(path, array)
    back = _data.read_idx(path)
    assert back.shape == array.shape and back.dtype == array.dtype
    np.testing.assert_array_equal(back, array)


def test_idx_header_follows_the_mnist_layout(tmp_path):
    # Bytes written by hand from the format description: magic 0x00000803 (uint8, 3 dims),
    # then the sizes as big-endian uint32, then the pixels row-major.
    images = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3)
    raw = (
        bytes([0, 0, 8, 3]) + b"\x00\x00\x00\x02\x00\x00\x00\x02\x00\x00\x00\x03" + images.tobytes()
    )
    (tmp_path / "hand").write_bytes(raw)
    np.testing.assert_array_equal(_data.read_idx(tmp_path / "hand"), images)
    _data.write_idx(tmp_path / "ours", images)
    assert (tmp_path / "ours").read_bytes() == raw
    labels = np.array([7, 300000], np.int32)  # int32 is stored big-endian: code 0x0C
    _data.write_idx(tmp_path / "labels", labels)
    raw = (tmp_path / "labels").read_bytes()
    assert raw[:4] == bytes([0, 0, 0x0C, 1]) and raw[8:] == labels.astype(">i4").tobytes()


def test_read_idx_rejects_truncated_and_foreign_files(tmp_path):
    _data.write_idx(tmp_path / "x", np.zeros((4, 4), np.uint8))
    (tmp_path / "cut").write_bytes((tmp_path / "x").read_bytes()[:-3])
    with pytest.raises(ValueError, match="header says shape"):
        _data.read_idx(tmp_path / "cut")
    (tmp_path / "png").write_bytes(PNG_MAGIC)
    with pytest.raises(ValueError, match="not an IDX file"):
        _data.read_idx(tmp_path / "png")


def write_fake_mnist(directory: Path, n_train: int = 120, n_test: int = 40) -> None:
    """Four small MNIST-format files: images 28x28 uint8, labels uint8; mixed .gz and plain."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for prefix, n, gz in (("train", n_train, True), ("t10k", n_test, False)):
        labels = np.arange(n, dtype=np.uint8) % 10
        images = rng.integers(0, 40, size=(n, 28, 28), dtype=np.uint8)
        images[np.arange(n), labels * 2 + 4, 4:24] = 255  # one bright row per class
        suffix = ".gz" if gz else ""
        _data.write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images)
        _data.write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels)


def test_mnist_loader_reads_the_four_idx_files(tmp_path):
    write_fake_mnist(tmp_path)
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "rb") as f:
        assert f.read(4) == bytes([0, 0, 8, 1])
    split = _data.mnist(tmp_path)
    assert split.x_train.shape == (120, 784) and split.x_test.shape == (40, 784)
    assert split.x_train.dtype == np.float32 and split.x_train.max() == 1.0
    np.testing.assert_array_equal(split.y_test, np.arange(40) % 10)


def test_gan_trains_on_mnist_idx_files(tmp_path):
    write_fake_mnist(tmp_path / "mnist")
    out = tmp_path / "gan"
    run_example(
        "examples/gan.py",
        *("--mnist", str(tmp_path / "mnist"), "--steps", "10", "--classifier-steps", "10"),
        *("--hidden", "32", "--samples", "1000", "--no-progress", "--out", str(out)),
    )
    samples = np.load(out / "samples.npy")
    assert samples.shape == (1000, 28, 28) and samples.min() >= 0 and samples.max() <= 1
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"].startswith("MNIST") and m["n_train"] == 120 and m["n_test"] == 40
    assert_png(out / "samples.png")
