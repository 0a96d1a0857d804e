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

from examples import _data  # noqa: E402
from tests import example_env  # noqa: E402

pytestmark = pytest.mark.no_x64

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_example(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**example_env({**os.environ, "JAX_PLATFORMS": "cpu"}), **(env or {})},
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
    # The plot's reference line: scikit-learn's digits fit scored by the same objective.
    assert 0.0 < m["digits"]["sklearn"]["train_objective"] < m["history"]["digits_loss"][0]
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


LM_TINY = (
    *("--vocab", "2048", "--context", "32", "--batch-size", "4", "--chunk-size", "256"),
    *("--d-model", "32", "--heads", "2", "--layers", "1", "--lr", "1e-2"),
    *("--student-d-model", "16", "--student-heads", "2", "--student-layers", "1"),
    *("--eval-every", "6", "--val-windows", "16", "--eval-batch", "8", "--sample-tokens", "12"),
    "--no-progress",
)


def test_language_model_trains_distils_and_reloads_its_teacher(tmp_path):
    from tokenizers import Tokenizer

    # Compiling (a dozen training steps, evaluations and samplers) is most of this test's time:
    # LLVM's optimisation level 0 halves it (tests/__init__.py), and the second run finds the
    # first one's programs in a compilation cache.
    env = {
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    cache, out = tmp_path / "cache", tmp_path / "lm"
    stdout = run_example(
        *("-m", "examples.language_model", *LM_TINY, "--cache", str(cache), "--out", str(out)),
        *("--mode", "both", "--steps", "18", "--distill-steps", "12", "--prompt", "import "),
        env=env,
        timeout=900,  # ~60 CPU-seconds, mostly compiling; far longer on a loaded box
    )
    assert "compiled temp memory" in stdout and "perplexity" in stdout
    assert f"tokenizer cache: {cache} (" in stdout and "JBCE_CACHE_DIR" in stdout
    m = json.loads((out / "metrics.json").read_text())
    data = m["data"]
    assert data["vocab"] == 2048 and not data["tokenizer_cache_hit"]
    assert data["tokenizer_cache"] == str(cache) and any(cache.glob("bpe-*.json"))
    assert data["train_files"] > 50 and 0 < data["val_files"] < data["train_files"]
    assert data["val_windows_evaluated"] == 16

    lm, distill = m["lm"], m["distill"]
    # The fused step never holds the [batch * context, vocab] logits, the materialised one does.
    for report in (lm, distill):
        temp = report["temp_bytes"]
        assert temp["headless"] <= temp["fused"] < temp["materialised"]
    logits = 4 * 4 * 32 * 2048
    assert lm["temp_bytes"]["materialised"] - lm["temp_bytes"]["fused"] > logits / 2

    h = lm["history"]
    assert len(h["train_loss"]) == 18 and h["val_steps"] == [0, 6, 12, 18]
    # From ~log(2048) = 7.6 nats at initialisation, 18 steps learn the unigram statistics.
    assert h["val_loss"][0] == pytest.approx(np.log(2048), abs=0.3)
    assert h["val_loss"][-1] < h["val_loss"][0] - 0.5
    assert np.mean(h["train_loss"][-6:]) < np.mean(h["train_loss"][:6])
    assert lm["val_perplexity"] == pytest.approx(np.exp(lm["val_loss"]))

    d = distill["history"]
    assert len(distill["distill_loss_history"]) == 12 and d["val_steps"] == [0, 6, 12]
    kl = distill["distill_loss_history"]
    assert all(np.isfinite(kl)) and min(kl) >= 0 and np.mean(kl[-4:]) < np.mean(kl[:4])
    assert d["val_loss"][-1] < d["val_loss"][0] - 0.3
    assert distill["teacher_val_loss"] == lm["val_loss"]

    # The sample is the prompt's tokens and then sampled ones, decoded by the saved tokenizer.
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    prompt = tokenizer.encode("import ").ids
    for report, name in ((lm, "sample.txt"), (distill, "student_sample.txt")):
        s = report["sample"]
        assert s["ids"][: len(prompt)] == prompt and len(prompt) < len(s["ids"]) <= 32
        assert all(0 <= i < 2048 for i in s["ids"])
        assert isinstance(s["text"], str) and s["text"] == tokenizer.decode(s["ids"])
        assert s["text"].startswith("import ") and (out / name).read_text() == s["text"]
    assert_png(out / "losses.png")
    assert_png(out / "distill_losses.png")

    # --mode distill reloads the saved teacher and tokenizer (same validation loss).
    out2 = tmp_path / "student"
    run_example(
        *("examples/language_model.py", *LM_TINY, "--cache", str(cache), "--out", str(out2)),
        *("--mode", "distill", "--teacher", str(out), "--distill-steps", "12"),
        env=env,
    )
    m2 = json.loads((out2 / "metrics.json").read_text())
    assert m2["teacher"]["val_loss"] == pytest.approx(lm["val_loss"], rel=1e-5)
    assert m2["data"]["val_tokens"] == data["val_tokens"] and "lm" not in m2
    # Same student seed, data and reloaded teacher: the same distillation run as in `both`.
    np.testing.assert_allclose(
        m2["distill"]["distill_loss_history"], distill["distill_loss_history"], rtol=1e-5
    )
    assert_png(out2 / "distill_losses.png")


def test_language_model_cache_is_the_flag_else_jbce_cache_dir_else_xdg(tmp_path, monkeypatch):
    from examples.language_model import parse_args

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("JBCE_CACHE_DIR", raising=False)
    assert parse_args([]).cache == tmp_path / "xdg" / "jbce"
    monkeypatch.setenv("JBCE_CACHE_DIR", str(tmp_path / "env"))
    assert parse_args([]).cache == tmp_path / "env"
    assert parse_args(["--cache", str(tmp_path / "flag")]).cache == tmp_path / "flag"


def test_distillation_plot_names_the_divergence_beta_selects():
    from examples.language_model import divergence_name

    assert divergence_name(0.0) == "forward KL(teacher || student)"
    assert divergence_name(1.0) == "reverse KL(student || teacher)"
    assert divergence_name(0.5) == "generalised Jensen-Shannon"


def test_data_parallel_and_multihost_plot_their_runs_next_to_one_device(tmp_path):
    run_example(
        *("-m", "examples.data_parallel", "--cpu-devices", "2", "--steps", "5"),
        *("--plot", str(tmp_path / "dp.png")),
    )
    assert_png(tmp_path / "dp.png")
    run_example(
        *("-m", "examples.multihost", "--local-processes", "2", "--cpu-devices", "2"),
        *("--steps", "2", "--plot", str(tmp_path / "mh.png")),
    )
    assert_png(tmp_path / "mh.png")


def test_language_model_tokens_round_trip_and_windows_cover_each_target_once(tmp_path):
    texts = ["def f(x):\n    return x + 1\n", "import os\nprint(os.sep)  # ünïcode\n"] * 20
    tokenizer = _data.train_bpe(texts, 300)
    stream = _data.token_stream(tokenizer, texts[:2])
    eot = tokenizer.token_to_id(_data.END_OF_TEXT)
    assert eot == 0 and stream.dtype == np.int32 and np.sum(stream == eot) == 2
    pieces = np.split(stream, np.flatnonzero(stream == eot) + 1)[:2]
    assert [tokenizer.decode(p[:-1].tolist()) for p in pieces] == texts[:2]

    w = _data.windows(np.arange(10, dtype=np.int32), 3)
    np.testing.assert_array_equal(w, [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]])
    np.testing.assert_array_equal(np.concatenate([r[1:] for r in w]), np.arange(1, 10))
    with pytest.raises(ValueError, match="no window"):
        _data.windows(np.arange(3, dtype=np.int32), 3)


def test_stdlib_split_is_by_file_name_and_deterministic():
    a, b = _data.stdlib_corpus(), _data.stdlib_corpus()
    assert a.train_names == b.train_names and a.val_names == b.val_names
    assert not set(a.train_names) & set(a.val_names)
    assert a.train_names == sorted(a.train_names) and all(n.endswith(".py") for n in a.val_names)
    assert 0.02 < len(a.val_names) / (len(a.val_names) + len(a.train_names)) < 0.3


def test_transformer_is_causal_and_generate_continues_the_prompt():
    import jax.numpy as jnp
    from flax import nnx

    from examples import _models
    from examples.language_model import generate

    model = _models.TransformerLM(50, d_model=16, heads=2, layers=2, context=8, rngs=nnx.Rngs(0))
    tokens = jnp.asarray([[3, 1, 4, 1, 5, 9, 2, 6]], jnp.int32)
    changed = tokens.at[0, 5].set(7)
    h, h2 = model.hidden(tokens), model.hidden(changed)
    assert h.shape == (1, 8, 16) and model(tokens).shape == (1, 8, 50)
    # Positions before the changed token cannot see it; the changed one and later ones do.
    np.testing.assert_array_equal(np.asarray(h[:, :5]), np.asarray(h2[:, :5]))
    assert not np.allclose(np.asarray(h[:, 5:]), np.asarray(h2[:, 5:]))

    ids = generate(model, [3, 1], new_tokens=20, temperature=0.0, seed=0)
    assert ids[:2] == [3, 1] and len(ids) == 8  # stops at the context length
    # Greedy decoding: each new id is the argmax of the logits at the previous position.
    logits = np.asarray(model(jnp.asarray([ids], jnp.int32))[0])
    assert ids[2:] == logits[1:-1].argmax(-1).tolist()
    assert generate(model, [3, 1], new_tokens=3, temperature=1.0, seed=1)[:2] == [3, 1]
    with pytest.raises(ValueError, match="prompt must have 1 to 7 tokens"):
        generate(model, list(range(8)), new_tokens=1, temperature=0.0, seed=0)
