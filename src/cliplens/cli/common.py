"""What every subcommand shares: the index-folder default, the model flags and how they become an encoder, and
argument types. Subcommand modules import from here (never from each other's command modules), so ``cli.core``,
``cli.scale``, ``cli.evaluate``, ``cli.study`` and ``cli.web`` form no import cycle. Commands load models through
:func:`load_model` here (``common.load_model``), the one place a test replaces to prove no model loads.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from cliplens._files import cliplens_home
from cliplens.errors import CliplensError

# How the CLI names the inputs a library error's ``fix`` asks for (cliplens.errors): the flag, and its metavar.
FLAGS = {"image": "--image PATH", "similar": "--similar ID", "index_dir": "--index-dir DIR", "weights": "--weights PATH",
         "pretrained": "--pretrained TAG", "device": "--device", "precision": "--precision", "seeds": "--seeds N",
         "templates": "--templates", "retrieval_depth": "--retrieval-depth N", "limit_per_class": "--limit-per-class N",
         "pg_index": "--pg-index", "pg_uri": "--pg-uri URI", "milvus_uri": "--milvus-uri URI",
         "ray_address": "--ray-address ADDR", "threshold": "--threshold T"}


def word_error(exc: CliplensError) -> str:
    """A library error as the CLI says it: its message, then the flags that fix it ("(--image PATH or
    --similar ID)")."""
    text = str(exc)
    if not getattr(exc, "fix", None):
        return text
    flags = []
    for name, value in exc.fix.items():
        flag = FLAGS.get(name, "--" + name.replace("_", "-"))
        flags.append(f"{flag.split()[0]} {value}" if value else flag)
    return f"{text} ({' or '.join(flags)})"


INDEX_DIR_HELP = "the index folder (default $CLIPLENS_INDEX_DIR, else $CLIPLENS_HOME/indexes/cifar100-test)"


def default_index_dir(name: str = "cifar100-test") -> Path:
    return Path(os.environ.get("CLIPLENS_INDEX_DIR") or cliplens_home() / "indexes" / name)


def add_model_flags(p: argparse.ArgumentParser, *, for_query: bool = False) -> None:
    g = p.add_argument_group("model")
    default_note = " (default: the index's own model)" if for_query else ""
    g.add_argument("--model", default=None, help=f"open_clip model name{default_note or ' (default ViT-B-32-quickgelu)'}")
    g.add_argument("--pretrained", default=None, help=f"pretrained tag{default_note or ' (default openai)'}")
    g.add_argument("--weights", type=Path, default=None, help="a local checkpoint file instead of the tag")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="where the model runs; auto picks cuda, then mps, then cpu")
    g.add_argument("--precision", default="exact", choices=["exact", "fast"],
                   help="exact (default): fp32, the reference's answers; fast: bf16 or int8 image tower and fp32 "
                        "text tower in ONNX Runtime where available (mean cosine >= 0.999; docs/performance.md)")


def model_choice(args, manifest=None) -> tuple[str, str, Path | None]:
    """(model name, pretrained tag, weights file) from the flags, falling back to the model an index was built
    with (a ``Manifest``)."""
    from cliplens.encoder import DEFAULT_MODEL, DEFAULT_PRETRAINED

    built = manifest.model if manifest is not None else None
    name = args.model or (built.name if built else None) or DEFAULT_MODEL
    weights = args.weights
    if (weights is None and args.pretrained is None and not args.model and built and not built.pretrained
            and ":" not in name):
        weights = built.weights_path  # the index was built from a file: use that file again
        if weights is None:
            raise CliplensError("this index was built with random weights; pass --weights or --pretrained")
    pretrained = args.pretrained or (built.pretrained if built and not args.model else None) or DEFAULT_PRETRAINED
    return name, pretrained, weights


def load_model(args, manifest=None, *, images_only: bool = False):
    """Build the encoder from flags, falling back to the model an index was built with.

    ``images_only`` (indexing): the torch-free image tower where it is cached for this model and exact precision
    (:mod:`cliplens.imageonly`), or, on the model's first exact run, cached now by a helper process: it encodes
    images only.
    """
    from cliplens.encoder import load_encoder

    name, pretrained, weights = model_choice(args, manifest)
    precision = getattr(args, "precision", "exact")
    if images_only:
        from cliplens import imageonly

        cached = imageonly.find(name=name, pretrained=pretrained, weights=weights, device=args.device,
                                precision=precision)
        if cached is None:  # the model's first run: cache the tower (where it can), then use it
            cached = imageonly.prepare(name=name, pretrained=pretrained, weights=weights, device=args.device,
                                       precision=precision, announce=not getattr(args, "quiet", False))
        if cached is not None:
            return cached
    return load_encoder(name, pretrained, weights=weights, device=args.device, precision=precision)


def lazy_model(args, index_dir):
    """The encoder the flags ask for, loaded only when something must be embedded: when the index in
    ``index_dir`` records that same model, its identity comes from the manifest (see cliplens.indexing.lazy)."""
    from cliplens.encoder import DEFAULT_MODEL, DEFAULT_PRETRAINED
    from cliplens.indexing.lazy import LazyEncoder, same_request
    from cliplens.store import read_current_manifest

    current = read_current_manifest(index_dir)
    name = args.model or DEFAULT_MODEL
    pretrained = None if args.weights else (args.pretrained or DEFAULT_PRETRAINED)
    known = current is not None and same_request(current.model, name=name, pretrained=pretrained,
                                                 weights=args.weights, precision=getattr(args, "precision", "exact"))
    return LazyEncoder(lambda: load_model(args, images_only=True), info=current.model if known else None)


def _whole(text: str, minimum: int, words: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {words}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _whole(text, 1, "at least 1")


def non_negative_int(text: str) -> int:
    return _whole(text, 0, "0 or more")


def cosine_float(text: str) -> float:
    """A cosine similarity from the command line: a finite number in -1..1 (so not "nan", which drops nothing)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from -1 to 1, got {text!r}") from None
    if not -1.0 <= value <= 1.0:  # False for nan as well
        raise argparse.ArgumentTypeError(f"must be a number from -1 to 1, got {text!r}")
    return value


def text_only_encoder(args, manifest, *, prepack: bool = False):
    """The index's own model as its cached torch-free text tower (:mod:`cliplens.textonly`), or None.

    None when the flags ask for another model or a GPU, or when the cache is not built yet. ``prepack``: for a
    process that answers many queries (slower to open, faster per query).
    """
    from cliplens.textonly import open_cached

    built = manifest.model
    if (args.model and args.model != built.name) or getattr(args, "device", "auto") not in ("auto", "cpu"):
        return None
    if args.pretrained and args.pretrained != built.pretrained:
        return None
    if args.weights is not None:
        from cliplens._files import cached_sha256

        path = Path(args.weights).expanduser()
        if not path.is_file() or cached_sha256(path) != built.weights_sha256:
            return None
    return open_cached(built, prepack=prepack)
