"""``python -m bench indexing|text|search|agreement|batch|all|process|gpu [options]`` (also ``cliplens bench ...``).

Every benchmark runs the reference pipeline and cliplens in this one process, on the same inputs, with the
real ViT-B-32-quickgelu architecture and random stand-in weights loaded through the real hub-cache path
(``HF_HUB_OFFLINE=1``), prints a Markdown table with ratios, and writes ``<out>/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import tempfile
from pathlib import Path

from cliplens.cli.core import positive_int  # no numpy: main() still calms BLAS threads before numpy loads

BENCHMARKS = ("indexing", "text", "search", "agreement", "batch")
# Fresh processes as users run them (ViT-B/32 only, minutes): not part of "all"
WHOLE_PROCESS = ("process",)
GPU = ("gpu",)  # CUDA indexing + queries in one call (bench/gpu.sh); a tiny CPU fallback without CUDA; not in "all"
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(float(s)) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes like 10000,100000, got {text!r}") from None
    if not sizes or min(sizes) < 10:
        raise argparse.ArgumentTypeError(f"sizes must be at least 10, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("benchmark", choices=(*BENCHMARKS, *WHOLE_PROCESS, *GPU, "all"))
    p.add_argument("--n", type=positive_int, default=None,
                   help="images for indexing and agreement (default 512; the batch sweep uses up to 128; "
                        "gpu: 10,000 on CUDA, 64 on the CPU fallback)")
    p.add_argument("--reps", type=positive_int, default=None,
                   help="repetitions: medians and spreads reported (default 3; gpu's CPU fallback: 1)")
    p.add_argument("--jpegs", type=int, default=20, help="JPEGs of 1-4 megapixels for the folder case (0: skip)")
    p.add_argument("--index-size", type=positive_int, default=10_000, help="vectors searched by the text benchmark")
    p.add_argument("--sizes", type=_sizes, default=[10_000, 100_000, 1_000_000], help="search benchmark sizes")
    p.add_argument("--backends", default="auto",
                   help="fast backends to run: auto (what --precision fast picks), all, or a comma list "
                        "(onnx-int8,torch-int8,bf16); 'none' runs exact only")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="cliplens batch size (default: its own; gpu: 1024 or the largest the GPU memory probe allows, "
                        "32 on the CPU fallback)")
    p.add_argument("--sample", type=positive_int, default=None,
                   help="gpu: images compared with the CPU exact path (default 512 on CUDA, 32 on the CPU)")
    p.add_argument("--device", choices=("auto", "cpu"), default="auto",
                   help="gpu: auto (CUDA when torch sees it) or cpu (the fallback even where a GPU is)")
    p.add_argument("--model", choices=("b32", "tiny"), default="b32",
                   help="b32: ViT-B-32-quickgelu (default); tiny: a 2-layer CLIP for smoke tests only")
    p.add_argument("--hf-home", type=Path, default=None,
                   help="use this Hugging Face cache (e.g. with real weights) instead of a temporary one with "
                        "random stand-in weights; nothing is written into it")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    p.add_argument("--before-src", type=Path, default=None,
                   help="process: also run each command with an older cliplens, e.g. the src/ of `git archive COMMIT src`")
    p.add_argument("--photos", type=positive_int, default=200, help="process: photos in the re-indexed folder")
    p.add_argument("--library", type=int, default=200,
                   help="process: photos of 0.3-12 MP indexed from nothing beside open_clip and rclip (0: skip)")
    p.add_argument("--cifar-sizes", type=_sizes, default=[256, 2000],
                   help="process: CIFAR images indexed from nothing beside open_clip's pipeline (default 256,2000)")
    p.add_argument("--heavy-reps", type=positive_int, default=None,
                   help="process: runs of each whole indexing case (default: --reps)")
    p.add_argument("--rclip", default=None,
                   help="process: the rclip 3.3.0 executable to compare with (default $CLIPLENS_RCLIP, then PATH)")
    p.add_argument("-v", "--verbose", action="store_true", help="log each repetition")
    return p


def main(argv: list[str] | None = None) -> int:
    from cliplens._threads import calm_blas_threads

    calm_blas_threads()  # as `cliplens` does: before numpy is imported
    args = build_parser().parse_args(argv)
    gpu_sizes = {"n": args.n, "reps": args.reps}  # gpu picks its own defaults per device
    args.n, args.reps = args.n or 512, args.reps or 3
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    command = "python -m bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    with tempfile.TemporaryDirectory(prefix="cliplens-bench-") as tmp:
        return _run(args, Path(tmp), command, gpu_sizes)


def _run(args, tmp: Path, command: str, gpu_sizes: dict | None = None) -> int:
    from bench import standin as sd

    wanted = list(BENCHMARKS) if args.benchmark == "all" else [args.benchmark]
    if wanted != ["search"]:  # every other benchmark loads the model: weights first, before open_clip is imported
        if args.hf_home is not None:
            standin = sd.use_existing(args.hf_home.expanduser(), args.model)
        else:
            standin = sd.prepare(tmp / "hf", args.model)
    reports = []
    if "search" in wanted:  # no model needed: run it first, while the process is small (peak RSS)
        from bench import search

        reports.append(search.run(sizes=args.sizes, reps=args.reps, command=command))
        _emit(reports[-1], args.out)
    if any(b in wanted for b in ("indexing", "text", "agreement", "batch")):
        reference = sd.load_reference(standin)
        encoders = {"exact": sd.load_ours(standin, precision="exact"), **_fast_encoders(sd, standin, args.backends)}
        if "text" in wanted:
            from bench import text

            chosen = {k: e for k, e in encoders.items() if k in ("exact", "fast")}
            served = sd.load_ours(standin, precision="exact")  # as `cliplens serve` runs it: text in ONNX Runtime
            if served.speed_up_text():
                chosen = {"exact": chosen["exact"], "exact-served": served,
                          **{k: e for k, e in chosen.items() if k != "exact"}}
            reports.append(text.run(reference=reference, encoders=chosen, workdir=tmp / "text", n=args.index_size,
                                    reps=args.reps, command=command))
            _emit(reports[-1], args.out)
        if any(b in wanted for b in ("indexing", "agreement", "batch")):
            if "indexing" in wanted:
                from bench import indexing

                reports.append(indexing.run(reference=reference, encoders=encoders, workdir=tmp / "indexing",
                                            n=args.n, reps=args.reps, jpegs=args.jpegs, batch_size=args.batch_size,
                                            command=command))
                _emit(reports[-1], args.out)
            if "agreement" in wanted:
                from bench import agreement

                reports.append(agreement.run(reference=reference, encoders=encoders, n=args.n, command=command))
                _emit(reports[-1], args.out)
            if "batch" in wanted:
                from bench import batch

                reports.append(batch.run(encoders=encoders, images=min(args.n, 128), reps=args.reps, command=command))
                _emit(reports[-1], args.out)
    if "gpu" in wanted:
        from bench import gpu

        reports.append(gpu.run(standin=standin, workdir=tmp / "gpu", command=command, batch_size=args.batch_size,
                               sample=args.sample, device=args.device, **(gpu_sizes or {})))
        _emit(reports[-1], args.out)
    if "process" in wanted:  # fresh processes: the harness only needs the stand-in's identity
        from bench import process

        info = sd.load_ours(standin, precision="exact").info
        reports.append(process.run(info=info, workdir=tmp / "process", reps=args.reps, command=command,
                                   before_src=args.before_src, photos=args.photos, library=args.library,
                                   cifar_sizes=tuple(args.cifar_sizes), heavy_reps=args.heavy_reps, standin=standin,
                                   rclip=args.rclip))
        _emit(reports[-1], args.out)
    combined = _combine(args.out)
    print(f"wrote {combined}")
    return 0


def _combine(out: Path) -> Path:
    """``latest.md``: the latest result of every benchmark in ``out``, each with its own machine line and command."""
    parts = [(out / f"{name}.md").read_text() for name in (*BENCHMARKS, *WHOLE_PROCESS, *GPU) if (out / f"{name}.md").is_file()]
    combined = out / "latest.md"
    combined.write_text("# cliplens benchmarks (latest run of each)\n\n" + "\n".join(parts))
    return combined


def _fast_encoders(sd, standin, backends: str) -> dict:
    from cliplens import fast

    if backends == "none":
        return {}
    if backends == "auto":
        enc = sd.load_ours(standin, precision="fast")
        return {"fast": enc}
    names = fast.available_backends() if backends == "all" else [b.strip() for b in backends.split(",") if b.strip()]
    out = {}
    auto = next((b for b in fast.AUTO_ORDER if b in fast.available_backends()), None)
    for name in names:
        enc = sd.load_ours(standin, precision="fast", fast_backend=name)
        out["fast" if name == auto else f"fast-{name}"] = enc
    return out


def _emit(report, out: Path) -> None:
    js, md = report.write(out)
    print(report.markdown())
    print(f"wrote {js} and {md}\n", flush=True)


if __name__ == "__main__":
    sys.exit(main())
