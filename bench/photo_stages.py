"""Where indexing a photo library spends its CPU: each stage timed alone, per photo, on the bench's library.

    python bench/photo_stages.py [--n 200] [--model-images 64]

Builds the 0.3-12 MP library of bench/photo_library.py (sample photos resized, cropped, rotated, as JPEG, PNG and
WebP) and times, one photo at a time on one thread: reading + sha256, the full decode (exact mode), the reduced
decode (fast mode: JPEG ``draft`` to 512 px), open_clip's eval transform and cliplens' own (``preprocess_pil``,
the same bits; fast mode's resamples only the crop), the two thumbnails, and the image tower (ViT-B/32, random
stand-in weights) per image on all cores: fp32 unpacked and packed, and fast mode's. On a 2-core machine
whole-process indexing costs about the sum of these in core seconds; that sum, set against rclip's, is what bounds
the whole-process ratio (docs/performance.md).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200, help="photos in the library")
    p.add_argument("--model-images", type=int, default=64, help="images per timed image-tower batch")
    args = p.parse_args(argv)

    from bench import standin
    from bench.photo_library import build_library

    with tempfile.TemporaryDirectory(prefix="cliplens-stages-") as tmp:
        tmp = Path(tmp)
        st = standin.prepare(tmp / "hf", "b32")
        build_library(tmp / "lib", args.n)
        files = sorted(q for q in (tmp / "lib").rglob("*") if q.is_file())

        import numpy as np
        import torch

        from cliplens.encoder import load_encoder
        from cliplens.preprocess import preprocess_pil
        from cliplens.sources.folder import allow_pixels, decode_image
        from cliplens.sources.photos import thumbnails

        allow_pixels(10**9)
        enc = load_encoder(st.model, st.pretrained, device="cpu")
        seconds: dict[str, float] = defaultdict(float)

        def timed(name, fn):
            t = time.perf_counter()
            out = fn()
            seconds[name] += time.perf_counter() - t
            return out

        pixels = []
        for path in files:
            timed("read + sha256", lambda: hashlib.sha256(path.read_bytes()).hexdigest())
            rgb = timed("decode, full (exact)", lambda: decode_image(str(path), max_pixels=10**9))
            small = timed("decode, reduced to 512 px (fast)",
                          lambda: decode_image(str(path), max_pixels=10**9, reduce_to=512))
            timed("open_clip's eval transform", lambda: enc.transform(rgb))
            pixels.append(timed("preprocess_pil (the same bits)", lambda: preprocess_pil(rgb, enc.fast_config)))
            timed("preprocess of the reduced decode, only the crop resampled (fast)",
                  lambda: preprocess_pil(small, enc.fast_config, crop_only=True))
            timed("thumbnails (256 WebP + 512 JPEG) of the full decode", lambda: thumbnails(rgb))
            timed("thumbnails (256 WebP + 512 JPEG) of the reduced decode", lambda: thumbnails(small))
            rgb.close()
            small.close()

        batch = np.stack(pixels[:args.model_images])
        enc.pack_images = False
        with torch.inference_mode():
            enc.model.visual(torch.from_numpy(batch[:2]))  # warm-up
            t = time.perf_counter()
            enc.model.visual(torch.from_numpy(batch))
            unpacked = (time.perf_counter() - t) / len(batch)
        enc.pack_images = True
        enc.encode_pixels(batch[:2])  # packs, warms up
        t = time.perf_counter()
        enc.encode_pixels(batch)
        packed = (time.perf_counter() - t) / len(batch)
        fast_enc = load_encoder(st.model, st.pretrained, device="cpu", precision="fast")
        fast_enc.encode_pixels(batch[:2])  # packs, warms up
        t = time.perf_counter()
        fast_enc.encode_pixels(batch)
        fast_tower = (time.perf_counter() - t) / len(batch)
        fast_name = f"image tower {fast_enc.info.precision} (fast)"

    cores = os.cpu_count() or 1
    print(f"{len(files)} photos of 0.3-12 MP; per photo, one thread (ms), and core seconds for all of them")
    print("| stage | ms per photo | core s for the library |")
    print("|---|---|---|")
    for name, s in seconds.items():
        print(f"| {name} | {1000 * s / len(files):.1f} | {s:.1f} |")
    for name, s in (("image tower fp32, unpacked", unpacked), ("image tower fp32, packed (exact)", packed),
                    (fast_name, fast_tower)):
        print(f"| {name}, {torch.get_num_threads()} threads | {1000 * s:.1f} wall | "
              f"{s * len(files) * min(cores, torch.get_num_threads()):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
