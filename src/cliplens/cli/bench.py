"""``cliplens bench ...``: run the benchmark harness of a source checkout (``python -m bench ...``).

The harness lives in the repository's ``bench/`` folder, which is not installed with the package, so this
command only works from an editable install of a checkout. It runs the harness in a fresh interpreter:
the harness must point the Hugging Face cache at its stand-in weights before anything imports
huggingface_hub, which this process may already have done.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from cliplens.errors import CliplensError


def find_checkout() -> Path | None:
    """The repository root this cliplens was imported from, if it is a checkout that has ``bench/``."""
    root = Path(__file__).resolve().parents[3]  # src/cliplens/cli/bench.py -> repository root
    if (root / "bench" / "__main__.py").is_file() and (root / "pyproject.toml").is_file():
        return root
    return None


def cmd_bench(args) -> int:
    root = find_checkout()
    if root is None:
        raise CliplensError("`cliplens bench` needs a source checkout: the benchmarks (bench/) are not installed "
                            "with the package; clone the repository, `pip install -e .` there and run it again")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    return subprocess.call([sys.executable, "-m", "bench", *args.bench_args], cwd=root, env=env)


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks vs open_clip's own pipeline (source checkout only)",
                       description="Forwards to `python -m bench` in the source checkout: "
                                   "`cliplens bench all --help` shows the harness's options.")
    p.add_argument("bench_args", nargs=argparse.REMAINDER,
                   help="indexing|text|search|agreement|all and the harness's options")
    p.set_defaults(handler=cmd_bench)
