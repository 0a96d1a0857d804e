"""``python -m examples [--out DIR]``: runs the examples with their default settings.

Logistic regression writes to ``DIR/logistic_regression``, the GAN to ``DIR/gan`` and the
language model (trained, then distilled into a smaller student) to ``DIR/language_model``,
and the code-search dual encoder (CLIP and SigLIP losses) to ``DIR/retrieval`` (``DIR``
defaults to ``runs/``). The language model caches its tokenizer and token streams (about
5 MB) in ``--cache DIR``, else ``$JBCE_CACHE_DIR``, else ``~/.cache/jbce``, and prints where.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from examples import gan, language_model, logistic_regression, retrieval


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m examples", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs"), help="output directory (runs/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="the language model's tokenizer cache (default: $JBCE_CACHE_DIR, else ~/.cache/jbce)",
    )
    args = p.parse_args(argv)
    common = ["--seed", str(args.seed)] + (["--no-progress"] if args.no_progress else [])
    lm_cache = [] if args.cache is None else ["--cache", str(args.cache)]
    print("== logistic regression ==")
    lr = logistic_regression.main(["--out", str(args.out / "logistic_regression"), *common])
    print("\n== GAN ==")
    g = gan.main(["--out", str(args.out / "gan"), *common])
    print("\n== language model ==")
    lm = language_model.main(["--out", str(args.out / "language_model"), *lm_cache, *common])
    print("\n== retrieval (CLIP and SigLIP losses) ==")  # 8 host devices only when run alone
    rt = retrieval.main(["--out", str(args.out / "retrieval"), *common])
    return {"logistic_regression": lr, "gan": g, "language_model": lm, "retrieval": rt}


if __name__ == "__main__":
    main()
