"""A small GPT on the Python standard library's own source code, with jbce's fused LM losses.

Data: the top-level ``*.py`` modules of the running Python's standard library (every machine
with Python has them), split by file (about 10% held out for validation, chosen by a hash of
the file name). A byte-level BPE vocabulary of ``--vocab`` (16384) subwords is trained on the
train files with the `tokenizers` package; the tokenizer and the token streams (about 5 MB)
are cached in ``--cache DIR`` (default ``$JBCE_CACHE_DIR``, else ``~/.cache/jbce``; the run
prints where), so only the first run spends the few seconds this takes.

Model: a decoder-only transformer in Flax NNX (learned positions, pre-norm blocks of causal
self-attention and a GELU MLP, a bias-free ``[d_model, vocab]`` head), trained with optax
(AdamW, linear warmup then cosine decay, gradients clipped to norm 1) on
``jbce.linear_softmax_cross_entropy(hidden, head_kernel, labels)``: the ``[batch * context,
vocab]`` logits are never materialised, only tiles of them. The script compiles the same
training step with the materialised loss (``optax.softmax_cross_entropy_with_integer_labels``
on ``hidden @ head_kernel``) and prints both steps' compiled temporary memory.

``--mode distill`` distils a smaller student (``--student-d-model``, ``--student-layers``;
same vocabulary, a different hidden size) from a trained model with
``jbce.linear_distillation_loss(student_hidden, student_head, teacher_hidden, teacher_head)``,
the generalised Jensen-Shannon divergence between the two softmaxes (``--beta`` 0: forward KL),
again fused, and compares its memory with the materialised ``jbce.jensen_shannon_divergence``
on both models' logits. ``--mode both`` (the default) trains the teacher, then distils.

Run ``python examples/language_model.py --out runs/language_model`` (or ``python -m
examples.language_model``); ``--mode distill --teacher runs/language_model`` distils from a
saved run. Writes ``metrics.json``, ``losses.png`` (train and validation loss), ``sample.txt``,
``model.npz`` + ``config.json`` + ``tokenizer.json`` (the trained model), and with
distillation ``distill_losses.png``, ``student.npz`` and ``student_sample.txt``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python examples/language_model.py`: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import jbce  # noqa: E402
from examples import _data, _models, _plot, _train  # noqa: E402

# --------------------------------------------------------------------------------------------
# Losses. A batch is {"tokens": int32 [batch, context + 1]}: inputs [:, :-1], targets [:, 1:].
# --------------------------------------------------------------------------------------------


def lm_loss(*, chunk_size: int | None = None):
    """Mean next-token cross-entropy, fused: the head's logits exist one tile at a time."""

    def loss_fn(model: _models.TransformerLM, batch) -> jax.Array:
        tokens = batch["tokens"]
        hidden = model.hidden(tokens[:, :-1])
        return jbce.linear_softmax_cross_entropy(
            hidden, model.head.kernel[...], tokens[:, 1:], chunk_size=chunk_size
        )

    return loss_fn


def materialised_lm_loss(model: _models.TransformerLM, batch) -> jax.Array:
    """The same loss through the ``[batch, context, vocab]`` logits (optax), for comparison."""
    tokens = batch["tokens"]
    logits = model.hidden(tokens[:, :-1]) @ model.head.kernel[...]
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def headless_loss(model: nnx.Module, batch) -> jax.Array:
    """A stand-in loss that skips the head (``mean(hidden ** 2)``): the step without any
    logits, whose memory is the model's own (activations, optimizer) that no loss can save."""
    return jnp.mean(model.hidden(batch["tokens"][:, :-1]) ** 2)


def _distillation_loss_fn():
    fn = getattr(jbce, "linear_distillation_loss", None)
    if fn is None:
        raise RuntimeError(
            "--mode distill/both needs jbce.linear_distillation_loss, which this jbce "
            f"({jbce.__file__}) does not have; run --mode lm, or install a jbce that has it"
        )
    return fn


def distill_loss(*, beta: float, temperature: float, chunk_size: int | None = None):
    """The student's fused JSD_beta to the (frozen) teacher's next-token distribution."""
    fused = _distillation_loss_fn()

    def loss_fn(student, teacher, batch):
        inputs = batch["tokens"][:, :-1]
        teacher_hidden = jax.lax.stop_gradient(teacher.hidden(inputs))
        return fused(
            student.hidden(inputs),
            student.head.kernel[...],
            teacher_hidden,
            jax.lax.stop_gradient(teacher.head.kernel[...]),
            beta=beta,
            temperature=temperature,
            chunk_size=chunk_size,
        )

    return loss_fn


def headless_distill_loss(student: nnx.Module, teacher: nnx.Module, batch) -> jax.Array:
    """Both models' forward passes and the student's backward pass, without either head."""
    inputs = batch["tokens"][:, :-1]
    teacher_term = jax.lax.stop_gradient(jnp.mean(teacher.hidden(inputs) ** 2))
    return jnp.mean(student.hidden(inputs) ** 2) + teacher_term


def materialised_distill_loss(*, beta: float, temperature: float):
    """The same divergence on both models' materialised logits, for comparison."""

    def loss_fn(student, teacher, batch):
        inputs = batch["tokens"][:, :-1]
        logits = student.hidden(inputs) @ student.head.kernel[...]
        teacher_logits = jax.lax.stop_gradient(teacher.hidden(inputs) @ teacher.head.kernel[...])
        return jbce.jensen_shannon_divergence(
            logits, teacher_logits, beta=beta, temperature=temperature
        )

    return loss_fn


# --------------------------------------------------------------------------------------------
# Training, evaluation, sampling.
# --------------------------------------------------------------------------------------------


def make_model(config: dict, seed: int) -> _models.TransformerLM:
    """The model initialised inside one ``nnx.jit`` (one compile, not one per initialiser)."""

    def create():
        return _models.TransformerLM(
            config["vocab"],
            d_model=config["d_model"],
            heads=config["heads"],
            layers=config["layers"],
            context=config["context"],
            rngs=nnx.Rngs(seed),
        )

    return nnx.jit(create)()


def optimizer(model: nnx.Module, *, lr: float, steps: int, weight_decay: float) -> nnx.Optimizer:
    """AdamW with 10% linear warmup then cosine decay to lr/10; decay on matrices only."""
    warmup = max(1, steps // 10)
    schedule = optax.warmup_cosine_decay_schedule(
        lr / 10, lr, warmup, max(steps, warmup + 1), end_value=lr / 10
    )
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(
            schedule,
            b2=0.95,
            weight_decay=weight_decay,
            mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params),
        ),
    )
    return nnx.jit(lambda m: nnx.Optimizer(m, tx, wrt=nnx.Param))(model)


def compiled_temp_bytes(step: _train.Step, state, batch) -> int:
    """Temporary memory XLA allocates for one compiled ``step(state, batch)`` (no donation)."""
    return int(jax.jit(step).lower(state, batch).compile().memory_analysis().temp_size_in_bytes)


def evaluator(graphdef: nnx.GraphDef, pick, windows: np.ndarray, batch: int):
    """``evaluate(state) -> mean next-token loss`` of ``pick(nnx.merge(graphdef, state))`` on
    ``windows`` (every token counted once; a ragged last batch is padded with ignored labels)."""

    @jax.jit
    def loss_sum(state, tokens, valid):
        model = pick(nnx.merge(graphdef, state))
        labels = jnp.where(valid[:, None], tokens[:, 1:], -100)
        hidden = model.hidden(tokens[:, :-1])
        return jbce.linear_softmax_cross_entropy(
            hidden, model.head.kernel[...], labels, reduction="sum"
        )

    pad = -len(windows) % batch
    padded = np.concatenate([windows, np.zeros((pad, windows.shape[1]), windows.dtype)])
    valid = np.arange(len(padded)) < len(windows)
    count = windows.shape[0] * (windows.shape[1] - 1)

    def evaluate(state) -> float:
        total = sum(
            float(loss_sum(state, padded[i : i + batch], valid[i : i + batch]))
            for i in range(0, len(padded), batch)
        )
        return total / count

    return evaluate


def generate(
    model: _models.TransformerLM,
    prompt: list[int],
    *,
    new_tokens: int,
    temperature: float,
    seed: int,
    stop: int | None = None,
) -> list[int]:
    """``prompt`` followed by up to ``new_tokens`` sampled ids (greedy when ``temperature`` is
    0), within the model's context, cut after the first ``stop`` id. No KV cache: each new token
    reruns the (small) model on the fixed-size buffer, the causal mask hiding the empty tail."""
    context = model.context
    if not 0 < len(prompt) < context:
        raise ValueError(f"the prompt must have 1 to {context - 1} tokens; got {len(prompt)}")
    start = len(prompt)
    end = min(context, start + new_tokens)
    graphdef, params = nnx.split(model)

    @jax.jit
    def run(params, buf, key):
        model = nnx.merge(graphdef, params)

        def body(i, carry):
            buf, key = carry
            hidden = jax.lax.dynamic_index_in_dim(model.hidden(buf[None])[0], i - 1, 0, False)
            logits = hidden @ model.head.kernel[...]  # one position: [vocab]
            key, sub = jax.random.split(key)
            if temperature > 0:
                nxt = jax.random.categorical(sub, logits / temperature)
            else:
                nxt = jnp.argmax(logits)
            return buf.at[i].set(nxt.astype(buf.dtype)), key

        return jax.lax.fori_loop(start, end, body, (buf, key))[0]

    buf = np.zeros(context, np.int32)
    buf[:start] = prompt
    ids = np.asarray(run(params, jnp.asarray(buf), jax.random.key(seed)))[:end].tolist()
    if stop is not None and stop in ids[start:]:
        ids = ids[: start + ids[start:].index(stop)]
    return ids


def save_params(path: Path, model: nnx.Module) -> None:
    flat = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
    np.savez(path, **{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat})


def load_params(path: Path, model: nnx.Module) -> None:
    state = nnx.state(model, nnx.Param)
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    with np.load(path) as saved:
        names = [jax.tree_util.keystr(k) for k, _ in flat]
        if set(names) != set(saved.files):
            raise ValueError(f"{path} does not hold this model's parameters")
        leaves = [jnp.asarray(saved[n]) for n in names]
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, leaves))


def train(
    name: str,
    graphdef: nnx.GraphDef,
    state,
    step: _train.Step,
    compare: dict[str, _train.Step],
    *,
    pick,
    data: dict[str, np.ndarray],
    args,
) -> tuple:
    """Compiles ``step`` and the ``compare`` steps for their memory, then trains with ``step``,
    evaluating on the validation windows every ``--eval-every`` steps. Returns (state, report)."""
    example = {"tokens": jnp.asarray(data["train"][: args.batch_size]), "step": jnp.int32(0)}
    temp = {"fused": compiled_temp_bytes(step, state, example)}
    temp.update({k: compiled_temp_bytes(s, state, example) for k, s in compare.items()})
    evaluate = evaluator(graphdef, pick, data["val"], args.eval_batch)
    val_steps, val_losses = [0], [evaluate(state)]

    def on_chunk(state, done):
        val_steps.append(done)
        val_losses.append(evaluate(state))
        return {"val": val_losses[-1]}

    state, history = _train.fit(
        step,
        state,
        {"tokens": data["train"]},
        steps=args.steps if name == "lm" else args.distill_steps,
        batch_size=args.batch_size,
        seed=args.seed,
        desc=name,
        chunk=args.eval_every,
        progress=not args.no_progress,
        on_chunk=on_chunk,
    )
    train_loss = history["loss"]
    report = {
        "temp_bytes": temp,
        "steps": len(train_loss),
        "final_train_loss": float(np.mean(train_loss[-args.eval_every :])),
        "val_loss": val_losses[-1],
        "history": {
            "train_loss": train_loss.tolist(),
            "val_steps": val_steps,
            "val_loss": val_losses,
        },
    }
    return state, report


def sample_report(model, tokenizer, args, seed: int) -> dict:
    prompt = tokenizer.encode(args.prompt).ids
    eot = tokenizer.token_to_id(_data.END_OF_TEXT)
    ids = generate(
        model,
        prompt,
        new_tokens=args.sample_tokens,
        temperature=args.temperature,
        seed=seed,
        stop=eot,
    )
    return {"prompt": args.prompt, "ids": ids, "text": tokenizer.decode(ids)}


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def print_memory(what: str, temp: dict[str, int], logits_bytes: int) -> None:
    ratio = temp["materialised"] / max(temp["fused"], 1)
    fused, mat = (temp[k] - temp["headless"] for k in ("fused", "materialised"))
    print(
        f"{what} step, compiled temp memory: fused {mib(temp['fused'])}, materialised "
        f"{mib(temp['materialised'])} ({ratio:.1f}x). Over the same step without a head "
        f"({mib(temp['headless'])}), the loss adds {mib(fused)} fused and {mib(mat)} "
        f"materialised (the f32 logits alone are {mib(logits_bytes)})"
    )


def param_count(model: nnx.Module) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


# --------------------------------------------------------------------------------------------
# The two modes.
# --------------------------------------------------------------------------------------------


def run_lm(args, tokenizer, data) -> tuple[_models.TransformerLM, dict, dict]:
    config = {
        "vocab": tokenizer.get_vocab_size(),
        "d_model": args.d_model,
        "heads": args.heads,
        "layers": args.layers,
        "context": args.context,
    }
    model = make_model(config, args.seed)
    opt = optimizer(model, lr=args.lr, steps=args.steps, weight_decay=args.weight_decay)
    graphdef, state = nnx.split((model, opt))
    state, report = train(
        "lm",
        graphdef,
        state,
        _train.supervised_step(graphdef, lm_loss(chunk_size=args.chunk_size)),
        {
            "materialised": _train.supervised_step(graphdef, materialised_lm_loss),
            "headless": _train.supervised_step(graphdef, headless_loss),
        },
        pick=lambda objs: objs[0],
        data=data,
        args=args,
    )
    model, _ = nnx.merge(graphdef, state)
    report["val_perplexity"] = math.exp(report["val_loss"])
    report["params"] = param_count(model)
    report["sample"] = sample_report(model, tokenizer, args, args.seed)
    logits_bytes = 4 * args.batch_size * args.context * config["vocab"]
    print_memory("LM training", report["temp_bytes"], logits_bytes)
    print(
        f"LM ({report['params'] / 1e6:.2f}M parameters, {report['steps']} steps): train loss "
        f"{report['final_train_loss']:.3f} (mean of the last {args.eval_every} steps), "
        f"validation loss {report['val_loss']:.3f}, perplexity {report['val_perplexity']:.1f}"
    )
    print(f"sample (temperature {args.temperature}):\n{report['sample']['text']}\n")
    return model, config, report


def run_distill(args, tokenizer, data, teacher, teacher_report) -> tuple[nnx.Module, dict]:
    config = {
        "vocab": tokenizer.get_vocab_size(),
        "d_model": args.student_d_model,
        "heads": args.student_heads,
        "layers": args.student_layers,
        "context": teacher.context,
    }
    student = make_model(config, args.seed + 1)
    opt = optimizer(student, lr=args.lr, steps=args.distill_steps, weight_decay=args.weight_decay)
    graphdef, state = nnx.split((student, opt, teacher))
    options = {"beta": args.beta, "temperature": args.distill_temperature}
    state, report = train(
        "distill",
        graphdef,
        state,
        _train.distill_step(graphdef, distill_loss(**options, chunk_size=args.chunk_size)),
        {
            "materialised": _train.distill_step(graphdef, materialised_distill_loss(**options)),
            "headless": _train.distill_step(graphdef, headless_distill_loss),
        },
        pick=lambda objs: objs[0],
        data=data,
        args=args,
    )
    student, _, _ = nnx.merge(graphdef, state)
    report.update(config=config, **options)
    report["distill_loss_history"] = report["history"].pop("train_loss")
    report["final_distill_loss"] = report.pop("final_train_loss")
    report["val_perplexity"] = math.exp(report["val_loss"])
    report["params"] = param_count(student)
    report["teacher_val_loss"] = teacher_report["val_loss"]
    report["sample"] = sample_report(student, tokenizer, args, args.seed)
    logits_bytes = 4 * args.batch_size * args.context * config["vocab"] * 2  # both models'
    print_memory("Distillation", report["temp_bytes"], logits_bytes)
    print(
        f"student ({report['params'] / 1e6:.2f}M parameters, d_model {config['d_model']}, "
        f"{report['steps']} steps): distillation loss {report['final_distill_loss']:.4f}, "
        f"validation loss {report['val_loss']:.3f} (perplexity {report['val_perplexity']:.1f}; "
        f"teacher {teacher_report['val_loss']:.3f})"
    )
    print(f"student sample:\n{report['sample']['text']}\n")
    return student, report


def load_data(args, tokenizer=None):
    """(tokenizer, {"train", "val"} windows, corpus summary): cached unless a tokenizer is given
    (a saved teacher's), which then encodes the corpus itself."""
    cache = None if args.no_cache else args.cache
    if tokenizer is None:
        tokenizer, train, val, corpus, hit = _data.cached_stdlib_tokens(args.vocab, cache)
        if cache is None:
            print("tokenizer cache: none (--no-cache)")
        else:
            size = sum(f.stat().st_size for f in cache.glob("*") if f.is_file())
            print(
                f"tokenizer cache: {cache} ({size / 2**20:.1f} MiB; "
                f"{'reused' if hit else 'written'}; move it with --cache DIR or "
                "JBCE_CACHE_DIR=DIR, skip it with --no-cache)"
            )
    else:
        corpus, hit = _data.stdlib_corpus(), False
        train = _data.token_stream(tokenizer, corpus.train_texts)
        val = _data.token_stream(tokenizer, corpus.val_texts)
    val_windows = _data.windows(val, args.context)
    if args.val_windows and len(val_windows) > args.val_windows:  # evenly spaced, fixed subset
        keep = np.linspace(0, len(val_windows) - 1, args.val_windows).round().astype(int)
        val_windows = val_windows[keep]
    data = {"train": _data.windows(train, args.context), "val": val_windows}
    summary = {
        "stdlib": str(corpus.root),
        "python": sys.version.split()[0],
        "train_files": len(corpus.train_names),
        "val_files": len(corpus.val_names),
        "val_file_names": corpus.val_names,
        "train_tokens": int(len(train)),
        "val_tokens": int(len(val)),
        "train_windows": int(len(data["train"])),
        "val_windows_evaluated": int(len(data["val"])),
        "vocab": tokenizer.get_vocab_size(),
        "bytes_per_token": sum(len(t.encode()) for t in corpus.train_texts) / len(train),
        "tokenizer_cache": None if cache is None else str(cache),
        "tokenizer_cache_hit": hit,
    }
    print(
        f"Python {summary['python']} standard library ({corpus.root}): "
        f"{summary['train_files']} train files ({summary['train_tokens']:,} tokens), "
        f"{summary['val_files']} validation files ({summary['val_tokens']:,} tokens); "
        f"BPE vocabulary {summary['vocab']:,} ({summary['bytes_per_token']:.2f} bytes/token"
        f"{', cached' if hit else ''})"
    )
    return tokenizer, data, summary


def divergence_name(beta: float) -> str:
    """What ``linear_distillation_loss``'s ``beta`` selects, for plot titles."""
    if beta == 0:
        return "forward KL(teacher || student)"
    if beta == 1:
        return "reverse KL(student || teacher)"
    return "generalised Jensen-Shannon"


def default_cache_dir() -> Path:
    """``$JBCE_CACHE_DIR``, else ``$XDG_CACHE_HOME/jbce``, else ``~/.cache/jbce``."""
    if os.environ.get("JBCE_CACHE_DIR"):
        return Path(os.environ["JBCE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jbce"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="directory for the run's files")
    p.add_argument("--mode", choices=("lm", "distill", "both"), default="both")
    p.add_argument("--teacher", type=Path, default=None, help="--mode distill: a saved --out")
    p.add_argument("--vocab", type=int, default=16384, help="BPE vocabulary size")
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="tokenizer and token cache dir (default: $JBCE_CACHE_DIR, else ~/.cache/jbce)",
    )
    p.add_argument("--no-cache", action="store_true", help="retrain the tokenizer, store none")
    p.add_argument("--context", type=int, default=128, help="tokens per training window")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=300, help="LM training steps")
    p.add_argument("--batch-size", type=int, default=8, help="windows per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.1)
    # Vocabulary columns per tile of both fused losses. 2048 is linear_softmax_cross_entropy's
    # own default; linear_distillation_loss's default keeps whole rows in its forward pass
    # (tiles of up to 2**23 logits, half of both models' logits at 1024 tokens).
    p.add_argument("--chunk-size", type=int, default=2048, help="fused losses' vocab tile")
    p.add_argument("--eval-every", type=int, default=50, help="steps between validations")
    p.add_argument("--val-windows", type=int, default=64, help="validation windows (0: all)")
    p.add_argument("--eval-batch", type=int, default=32)
    p.add_argument("--student-d-model", type=int, default=64)
    p.add_argument("--student-heads", type=int, default=2)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--distill-steps", type=int, default=200)
    p.add_argument("--beta", type=float, default=0.0, help="JSD weight (0: forward KL)")
    p.add_argument("--distill-temperature", type=float, default=1.0)
    p.add_argument("--prompt", default="def", help="text the samples continue")
    p.add_argument("--sample-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=0.7, help="sampling (0: greedy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = p.parse_args(argv)
    if args.cache is None:
        args.cache = default_cache_dir()
    if args.mode == "distill" and args.teacher is None:
        p.error("--mode distill needs --teacher DIR (the --out of a --mode lm or both run)")
    if args.steps < 1 or args.distill_steps < 1 or args.eval_every < 1:
        p.error("--steps, --distill-steps and --eval-every must be positive")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    if args.mode in ("distill", "both"):
        _distillation_loss_fn()  # fail before training a teacher, not after
    options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    metrics: dict = {"args": options}
    if args.mode == "distill":
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(args.teacher / "tokenizer.json"))
        tokenizer, data, metrics["data"] = load_data(args, tokenizer)
        config = json.loads((args.teacher / "config.json").read_text())
        if config["context"] != args.context:
            raise ValueError(
                f"--context {args.context} differs from the teacher's {config['context']}"
            )
        teacher = make_model(config, args.seed)
        load_params(args.teacher / "model.npz", teacher)
        saved = json.loads((args.teacher / "metrics.json").read_text())["lm"]["val_loss"]
        graphdef, params = nnx.split(teacher)
        teacher_report = {
            "val_loss": evaluator(graphdef, lambda m: m, data["val"], args.eval_batch)(params),
            "saved_val_loss": saved,
        }
        print(
            f"teacher {args.teacher}: validation loss {teacher_report['val_loss']:.4f} "
            f"(its run saved {saved:.4f})"
        )
        metrics["teacher"] = {"config": config, **teacher_report}
    else:
        tokenizer, data, metrics["data"] = load_data(args)
        teacher, config, teacher_report = run_lm(args, tokenizer, data)
        metrics["lm"] = {"config": config, **teacher_report}
    if args.mode != "lm":
        student, metrics["distill"] = run_distill(args, tokenizer, data, teacher, teacher_report)
    metrics["seconds"] = time.perf_counter() - start
    print(f"({metrics['seconds']:.1f} s)")

    if args.out is not None:
        out = args.out
        out.mkdir(parents=True, exist_ok=True)
        written = ["metrics.json"]
        if "lm" in metrics:
            lm = metrics["lm"]
            tokenizer.save(str(out / "tokenizer.json"))
            (out / "config.json").write_text(json.dumps(config, indent=2))
            save_params(out / "model.npz", teacher)
            (out / "sample.txt").write_text(lm["sample"]["text"])
            h = lm["history"]
            _plot.train_val_panels(
                out / "losses.png",
                {
                    "jbce.linear_softmax_cross_entropy": {
                        "train": (np.arange(1, len(h["train_loss"]) + 1), h["train_loss"]),
                        "validation": (h["val_steps"], h["val_loss"]),
                    }
                },
                ylabels={"jbce.linear_softmax_cross_entropy": "next-token loss (nats)"},
                smooth=("train",),
            )
            written += ["losses.png", "sample.txt", "model.npz", "config.json", "tokenizer.json"]
        if "distill" in metrics:
            d = metrics["distill"]
            save_params(out / "student.npz", student)
            (out / "student_sample.txt").write_text(d["sample"]["text"])
            h = d["history"]
            steps = np.arange(1, len(d["distill_loss_history"]) + 1)
            title = f"linear_distillation_loss, beta={d['beta']:g}: {divergence_name(d['beta'])}"
            _plot.train_val_panels(
                out / "distill_losses.png",
                {
                    title: {
                        "train": (steps, d["distill_loss_history"]),
                    },
                    "validation cross-entropy": {
                        "student": (h["val_steps"], h["val_loss"]),
                        "teacher": ([0], [d["teacher_val_loss"]]),
                    },
                },
                ylabels={"validation cross-entropy": "next-token loss (nats)"},
                smooth=("train",),
            )
            written += ["distill_losses.png", "student.npz", "student_sample.txt"]
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(f"wrote {out}/" + ", ".join(written))
    return metrics


if __name__ == "__main__":
    main()
