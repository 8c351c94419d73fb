"""Nothing to do costs nothing: re-running ``cliplens index`` on an unchanged source, against the first run.

    python bench/reindex.py --n 10000

For each source (a folder of N small PNGs, the same files as an image list, a CIFAR-100-format set of N images)
it runs ``cliplens index`` once (the reference: walks, hashes, loads the model, embeds) and then again on the
unchanged source, in this one process, and prints both times and their ratio; then the second run once more as
a fresh ``python -m cliplens`` process (the time a user waits, Python and numpy start-up included). The model is
the 2-layer stand-in CLIP (random weights): the re-run never loads a model, so its size does not matter here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="cliplens-reindex-") as tmp:
        tmp = Path(tmp)
        from bench import standin as sd

        sd.prepare(tmp / "hf", "tiny")
        model = f"hf-hub:{sd.TINY_REPO}"
        os.environ["CLIPLENS_HOME"] = str(tmp / "home")
        import numpy as np
        from PIL import Image

        from bench.data import write_cifar100
        from cliplens.cli import main as cli

        photos = tmp / "photos"
        rng = np.random.default_rng(0)
        for i in range(args.n):
            sub = photos / f"d{i // 1000:02d}"
            sub.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(sub / f"{i:05d}.png")
        rels = sorted(str(p.relative_to(photos)) for p in photos.rglob("*.png"))
        (photos / "list.csv").write_text("path,caption\n" + "".join(f"{r},photo {r}\n" for r in rels))
        write_cifar100(tmp / "cifar", args.n)
        common = ["--model", model, "--device", "cpu", "-q", "--batch-size", "256"]
        cases = {
            "folder": ["index", str(photos), "--index-dir", str(tmp / "i-folder"), *common],
            "list": ["index", "list", str(photos / "list.csv"), "--index-dir", str(tmp / "i-list"), *common],
            "cifar100-format": ["index", "cifar100", "--data-dir", str(tmp / "cifar"), "--no-verify",
                                "--index-dir", str(tmp / "i-cifar"), *common],
        }
        rows = []
        for name, argv in cases.items():
            t0 = time.perf_counter()
            assert cli(argv) == 0
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            assert cli(argv) == 0
            again = time.perf_counter() - t0
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "cliplens", *argv], capture_output=True, text=True,
                               env=dict(os.environ))
            fresh = time.perf_counter() - t0
            assert r.returncode == 0, r.stderr
            rows.append({"source": name, "items": args.n, "first_s": round(first, 3), "rerun_s": round(again, 3),
                         "rerun_process_s": round(fresh, 3), "ratio": round(first / again, 1)})
    lines = [f"# Re-indexing an unchanged source ({args.n} items; load average {os.getloadavg()[0]:.1f})", "",
             "| source | first run s | re-run s (in process) | re-run s (fresh process) | first / re-run |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['source']} | {r['first_s']} | {r['rerun_s']} | {r['rerun_process_s']} | {r['ratio']}x |"
              for r in rows]
    lines += ["", f"Command: `python bench/reindex.py --n {args.n}`"]
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reindex.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "reindex.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
