"""Indexing a photo library, whole process: time and peak memory of ``cliplens index FOLDER`` for two code trees.

    python bench/photo_library.py --before /path/to/old/src --after src [--n 300]

The folder is built from the sample photos scikit-image and scikit-learn ship (real photographs and scans: the
astronaut, coffee, chelsea, china, flower, rocket, ...), each written in variants a library holds: resized to
0.3-12 megapixels, cropped, rotated with an EXIF orientation tag, saved as JPEG at several qualities, PNG and WebP,
some with EXIF dates and camera tags. The model is ViT-B/32 with random stand-in weights (the bench's usual
stand-in: same architecture and cost as the real one). Each tree indexes the same folder into a fresh index folder,
as a fresh process, alternating (A B A B), and the median and spread are printed with peak RSS (``/proc`` VmHWM of
the process, read by a wrapper). Results: bench/results/photo_library.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WRAP = r"""
import re, runpy, sys
sys.argv = ["cliplens"] + sys.argv[1:]
try:
    runpy.run_module("cliplens", run_name="__main__")
except SystemExit as exc:
    code = exc.code
else:
    code = 0
hwm = int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024
print(f"PEAK_MB {hwm:.0f}", file=sys.stderr)
sys.exit(code)
"""


def sample_photos() -> list:
    from PIL import Image

    paths = []
    try:
        import skimage.data

        root = Path(skimage.data.__file__).parent
        paths += [p for p in sorted(root.iterdir()) if p.suffix.lower() in (".png", ".jpg", ".jpeg")]
    except ImportError:
        pass
    import sklearn.datasets

    paths += sorted((Path(sklearn.datasets.__file__).parent / "images").glob("*.jpg"))
    out = []
    for p in paths:
        with Image.open(p) as im:
            if min(im.size) >= 128:
                out.append((p.stem, im.convert("RGB")))
    return out


def build_library(root: Path, n: int, seed: int = 0) -> dict:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = sample_photos()
    root.mkdir(parents=True)
    megapixels = []
    for i in range(n):
        name, im = photos[i % len(photos)]
        mp = float(np.exp(rng.uniform(np.log(0.3), np.log(12.0))))
        scale = (mp * 1e6 / (im.width * im.height)) ** 0.5
        v = im.resize((max(16, round(im.width * scale)), max(16, round(im.height * scale))), Image.Resampling.BICUBIC)
        if rng.random() < 0.3:  # a crop
            w, h = v.size
            v = v.crop((int(w * 0.1), int(h * 0.1), int(w * 0.9), int(h * 0.9)))
        exif = Image.Exif()
        if rng.random() < 0.6:
            exif.get_ifd(0x8769)[0x9003] = f"20{rng.integers(15, 25)}:{rng.integers(1, 13):02d}:10 12:00:00"
            exif[0x010F], exif[0x0110] = ("Apple", "iPhone 13") if rng.random() < 0.5 else ("Canon", "EOS R6")
        if rng.random() < 0.15:
            exif[0x0112] = 6
        fmt = rng.choice(["JPEG"] * 7 + ["PNG", "WEBP"])
        ext = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}[fmt]
        folder = root / f"{2015 + i % 10}"
        folder.mkdir(exist_ok=True)
        kwargs = {"quality": int(rng.integers(70, 96))} if fmt != "PNG" else {}
        if fmt == "JPEG":
            kwargs["exif"] = exif.tobytes()
        v.save(folder / f"{name}-{i:04d}{ext}", format=fmt, **kwargs)
        megapixels.append(v.width * v.height / 1e6)
    return {"photos": n, "sources": len(photos), "megapixels_min": round(min(megapixels), 2),
            "megapixels_max": round(max(megapixels), 2), "megapixels_median": round(statistics.median(megapixels), 2),
            "bytes": sum(p.stat().st_size for p in root.rglob("*") if p.is_file())}


def run_once(src: Path, folder: Path, index: Path, env: dict) -> tuple[float, float]:
    e = {**env, "PYTHONPATH": str(src)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WRAP, "index", str(folder), "--index-dir", str(index), "-q",
                           "--device", "cpu"], env=e, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"cliplens index failed with {src}:\n{proc.stderr[-2000:]}")
    peak = float(proc.stderr.rsplit("PEAK_MB", 1)[1].split()[0])
    return seconds, peak


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", type=Path, required=True, help="src folder of the reference tree")
    p.add_argument("--after", type=Path, required=True, help="src folder of the tree measured")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args()
    from bench import standin as sd

    with tempfile.TemporaryDirectory(prefix="cliplens-photos-") as tmp:
        tmp = Path(tmp)
        sd.prepare(tmp / "hf", "b32")
        env = {**os.environ, "HF_HOME": str(tmp / "hf"), "HF_HUB_OFFLINE": "1", "CLIPLENS_HOME": str(tmp / "home")}
        library = build_library(tmp / "photos", args.n)
        runs: dict[str, list] = {"before": [], "after": []}
        for r in range(args.repeats):
            for name, src in (("before", args.before), ("after", args.after)):
                runs[name].append(run_once(src.resolve(), tmp / "photos", tmp / f"idx-{name}-{r}", env))
                print(name, r, runs[name][-1], flush=True)
        with os.popen("uptime") as f:
            load = f.read().strip().split("load average:")[-1].strip()
    rows = {}
    for name, values in runs.items():
        secs, peaks = [v[0] for v in values], [v[1] for v in values]
        rows[name] = {"seconds_median": round(statistics.median(secs), 2), "seconds": [round(s, 2) for s in secs],
                      "images_per_second": round(args.n / statistics.median(secs), 2),
                      "peak_mb_median": round(statistics.median(peaks)), "peak_mb": peaks}
    result = {"library": library, "load_average": load, "runs": rows, "command": " ".join(sys.argv),
              "model": "ViT-B-32-quickgelu, random stand-in weights, exact precision, CPU"}
    md = [f"# Indexing a photo library ({args.n} photos, {library['megapixels_min']}-{library['megapixels_max']} MP, "
          f"median {library['megapixels_median']} MP; load average {load})", "",
          "| tree | seconds (median) | runs | images/s | peak RSS MB |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        md.append(f"| {name} | {r['seconds_median']} | {', '.join(map(str, r['seconds']))} | {r['images_per_second']} "
                  f"| {r['peak_mb_median']} |")
    md += ["", f"Command: `python bench/photo_library.py --before OLD/src --after src --n {args.n}`", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "photo_library.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "photo_library.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
