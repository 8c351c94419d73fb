"""Peak memory of preprocessing large photos as one batch: decoded as a list (the reference, what
``FolderSource.load`` returned before) versus streamed one at a time (``FolderSource.load`` now).

    PYTHONPATH=src:tests python bench/decode_memory.py [--size 9000] [--count 3]

Each way runs in its own process (freed pages would otherwise be reused and hide the second peak), with the
high-water mark reset through /proc/self/clear_refs (Linux) after the model is loaded; prints both and the ratio.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def _hwm_mb() -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def _rss_mb() -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def _child(root: Path, count: int, how: str) -> None:
    import conftest  # noqa: F401  (tests/: offline hub cache in a temporary HF_HOME)
    import model_fixture

    from cliplens.sources.folder import FolderSource, decode_image
    from cliplens.encoder import load_encoder

    enc = load_encoder(model_fixture.write_tiny_model(conftest.HF_HOME), device="cpu")
    rels = [f"big{i}.jpg" for i in range(count)]
    enc.preprocess(FolderSource(root, rels[:1], max_pixels=10**9).load(0, 1)[:1])  # warm-up: imports, pools
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_mb()
    if how == "list":
        enc.preprocess([decode_image(root / r, max_pixels=10**9) for r in rels])
    else:
        enc.preprocess(FolderSource(root, rels, max_pixels=10**9).load(0, count))
    print(f"{_hwm_mb() - before:.0f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=9000)
    p.add_argument("--count", type=int, default=3)
    p.add_argument("--child", nargs=2, metavar=("ROOT", "HOW"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return _child(Path(args.child[0]), args.count, args.child[1])
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        ramp = Image.linear_gradient("L").resize((args.size, args.size))
        for i in range(args.count):
            Image.merge("RGB", (ramp, ramp.transpose(Image.Transpose.ROTATE_90), Image.new("L", ramp.size, 40 * i))
                        ).save(Path(tmp) / f"big{i}.jpg", quality=80)
        del ramp
        peaks = {how: float(subprocess.run([sys.executable, __file__, "--count", str(args.count), "--child", tmp, how],
                                           check=True, capture_output=True, text=True).stdout.split()[-1])
                 for how in ("list", "stream")}
    one = args.size * args.size * 3 / 2**20
    print(f"| {args.count} x {args.size}x{args.size} JPEG, one batch | peak MiB | x one decoded image ({one:.0f} MiB) |")
    print("|---|---|---|")
    print(f"| decoded as a list (reference) | {peaks['list']:.0f} | {peaks['list'] / one:.2f} |")
    print(f"| streamed by FolderSource.load | {peaks['stream']:.0f} | {peaks['stream'] / one:.2f} |")
    print(f"ratio reference / cliplens: {peaks['list'] / peaks['stream']:.2f}")


if __name__ == "__main__":
    main()
