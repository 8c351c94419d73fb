"""Whole-process benchmarks: each command as a user types it, in a fresh process, model load and imports included.

Every case runs ours and its anchor alternately (A B A B ...), one warm-up of each first (page cache, ONNX cache),
then ``reps`` timed runs of each; the table gives the median wall time with its range, the median of each
process's peak resident memory (``ru_maxrss`` from ``wait4``: the child alone), and the ratio of medians.

Anchors: for the one-shot query, open_clip's own pipeline as a short script (import open_clip, load the model,
tokenize, encode, cosine over the memory-mapped vectors, print the top 10 refs); for every case, with
``--before-src``, the same command run by an older cliplens (``git archive <commit> src``). Inputs: the stand-in
ViT-B/32 weights, a 10,000-item CIFAR-100-format index (random vectors through the real store), a folder of
photos, a CIFAR-format split.
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench.common import Report, Stats, ratio

REFERENCE_QUERY = '''
import sys, numpy as np, open_clip, torch, pyarrow.parquet as pq
index, words = sys.argv[1], sys.argv[2]
model, _, _ = open_clip.create_model_and_transforms("ViT-B-32-quickgelu", pretrained="openai")
model.eval()
tokenizer = open_clip.get_tokenizer("ViT-B-32-quickgelu")
with torch.no_grad():
    q = model.encode_text(tokenizer(["a photo of a " + words + "."]))
q = torch.nn.functional.normalize(q, dim=-1).numpy()[0]
emb = np.load(index + "/embeddings.npy", mmap_mode="r")
scores = emb @ q
top = np.argsort(-scores)[:10]
refs = pq.read_table(index + "/items.parquet", columns=["ref"]).column("ref").to_pylist()
for i in top:
    print(f"{scores[i]:.4f} {i} {refs[i]}")
'''


TIME = "/usr/bin/time"  # GNU time: the child's peak RSS (ru_maxrss seen from a small parent; ours is large)


def run_once(argv: list[str], env: dict, *, ready_port: int | None = None, timeout: float = 300.0) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one process; with ``ready_port``: seconds until it answers HTTP there.

    Peak RSS comes from GNU time when installed (Linux keeps a parent's peak in a forked child's ru_maxrss, so
    this process, which holds a model, cannot read it itself); else from ``wait4`` (then an upper bound).
    """
    import signal
    import tempfile

    with tempfile.NamedTemporaryFile(prefix="cliplens-rss-", suffix=".txt") as rss_file:
        wrap = [TIME, "-f", "%M", "-o", rss_file.name] if os.path.exists(TIME) else []
        t0 = time.perf_counter()
        proc = subprocess.Popen(wrap + argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        wall = None
        if ready_port is not None:
            url = f"http://127.0.0.1:{ready_port}/api/indexes"
            while time.perf_counter() - t0 < timeout and proc.poll() is None:
                try:
                    with urllib.request.urlopen(url, timeout=1) as r:
                        if r.status == 200:
                            wall = time.perf_counter() - t0
                            break
                except OSError:
                    time.sleep(0.02)
            os.killpg(proc.pid, signal.SIGINT)  # the server stops (Ctrl-C); GNU time ignores SIGINT and reports
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
        if wall is None:
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {err.strip()[-500:]}")
        text = Path(rss_file.name).read_text().strip().splitlines() if wrap else []
        peak_kb = int(text[-1]) if text and text[-1].isdigit() else usage.ru_maxrss
    return wall, peak_kb / 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cliplens(src: Path) -> list[str]:
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(src)!r}); from cliplens.cli import main; "
                                  "sys.exit(main())"]


def alternate(variants: dict[str, tuple[list[str], dict]], *, reps: int, serve: bool = False) -> dict:
    """variant -> {"wall": Stats, "rss": median MiB}; one warm-up each, then A B A B ..."""
    walls: dict[str, list[float]] = {k: [] for k in variants}
    peaks: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(reps + 1):
        for name, (argv, env) in variants.items():
            port = free_port() if serve else None
            cmd = [a.replace("{port}", str(port)) for a in argv] if serve else argv
            wall, peak = run_once(cmd, env, ready_port=port)
            if rep:  # the first round warms up
                walls[name].append(wall)
                peaks[name].append(peak)
    return {k: {"wall": Stats.of(walls[k]), "rss": statistics.median(peaks[k]), "walls": walls[k],
                "rss_all": peaks[k]} for k in variants}


def prepare(workdir: Path, info, *, photos: int) -> dict[str, Path]:
    """The 10k-item index, a photo folder and a CIFAR split, with their indexes built by this cliplens."""
    from bench.data import smooth_images
    from bench.process_data import make_labelled_index

    paths = {"index": workdir / "index10k", "photos": workdir / "photos", "photos_index": workdir / "photos-index",
             "cifar": workdir / "cifar", "cifar_index": workdir / "cifar-index"}
    make_labelled_index(paths["index"], info, 10_000, data_dir=workdir / "cifar10k")
    from PIL import Image

    paths["photos"].mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(smooth_images(photos, (480, 640), seed=7)):
        Image.fromarray(a).save(paths["photos"] / f"photo_{i:03d}.jpg", quality=85)
    from bench.data import write_cifar100

    write_cifar100(paths["cifar"], 256)
    return paths


def run(*, info, workdir: Path, reps: int, command: str, before_src: Path | None = None, photos: int = 200) -> Report:
    src = Path(__file__).resolve().parents[1] / "src"
    base = {**os.environ, "CLIPLENS_HOME": str(workdir / "home")}  # its own caches (sha256, ONNX)
    env = {**base, "PYTHONPATH": str(src)}
    env_before = {**base, "PYTHONPATH": str(before_src)} if before_src else None
    paths = prepare(workdir, info, photos=photos)
    ours = _cliplens(src)
    before = _cliplens(before_src) if before_src else None
    # Build the photo and CIFAR indexes once (and the text-only cache, by a first text search): real runs.
    for argv in (["index", str(paths["photos"]), "--index-dir", str(paths["photos_index"]), "-q"],
                 ["index", "cifar100", "--data-dir", str(paths["cifar"]), "--no-verify", "--index-dir",
                  str(paths["cifar_index"]), "-q"],
                 ["search", "tractor", "--index-dir", str(paths["index"])]):
        subprocess.run(ours + argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cases = {
        "one-shot text query, 10k index": (["search", "tractor", "--index-dir", str(paths["index"])], "open_clip script"),
        "re-index an unchanged folder": (["index", str(paths["photos"]), "--index-dir", str(paths["photos_index"]),
                                          "-q"], None),
        "re-index an unchanged CIFAR split (256)": (["index", "cifar100", "--data-dir", str(paths["cifar"]),
                                                     "--no-verify", "--index-dir", str(paths["cifar_index"]), "-q"], None),
        "info": (["info", "--index-dir", str(paths["index"])], None),
        "--help": (["--help"], None),
        "serve: ready to answer": (["serve", "--index-dir", str(paths["index"]), "--port", "{port}"], None),
    }
    report = Report(name="process", title="Whole-process runs: commands as users type them (fresh process each)",
                    config={"command": command, "reps": reps, "photos": photos, "index_items": 10_000,
                            "before_src": str(before_src) if before_src else None})
    rows, data = [], {}
    for case, (argv, anchor) in cases.items():
        variants = {"cliplens": (ours + argv, env)}
        if anchor:
            variants[anchor] = ([sys.executable, "-c", REFERENCE_QUERY, str(paths["index"]), "tractor"], env)
        if before:
            variants["cliplens before"] = (before + argv, env_before)
        res = alternate(variants, reps=reps, serve=case.startswith("serve"))
        data[case] = {k: {"wall": v["wall"].to_json(), "walls": v["walls"], "peak_rss_mb": v["rss"],
                          "peak_rss_mb_all": v["rss_all"]} for k, v in res.items()}
        mine = res["cliplens"]["wall"].median
        for name, v in res.items():
            rows.append([case, name, v["wall"].text("{:.2f}"), f"{v['rss']:.0f}",
                         "-" if name == "cliplens" else ratio(v["wall"].median, mine)])
    report.table(f"median wall seconds (min-max) of {reps} runs after a warm-up, A B A B; peak RSS median MiB",
                 ["case", "variant", "wall s", "peak RSS MiB", "its time / ours (>1: ours faster)"], rows)
    report.data = data
    report.notes += [
        "The one-shot query reads a CIFAR-100-format index of 10,000 random unit vectors written through the real "
        "store (bench/process_data.py); the text-only tower was cached by one earlier torch search.",
        "Serve: seconds from spawning `cliplens serve` to the first 200 answer of GET /api/indexes.",
        "A shared 2-core machine: compare ratios from the same run, not absolute numbers across runs.",
    ]
    shutil.rmtree(workdir, ignore_errors=True)
    return report
