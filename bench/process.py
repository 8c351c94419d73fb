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

from bench import rclip_ref
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
from pathlib import Path
current = Path(index, "CURRENT")  # the index's current generation folder
files = Path(index, current.read_text().strip()) if current.is_file() else Path(index)
emb = np.load(files / "embeddings.npy", mmap_mode="r")
scores = emb @ q
top = np.argsort(-scores)[:10]
refs = pq.read_table(files / "items.parquet", columns=["ref"]).column("ref").to_pylist()
for i in top:
    print(f"{scores[i]:.4f} {i} {refs[i]}")
'''


REFERENCE_INDEX = '''
import pickle, sys, numpy as np, open_clip, torch
from pathlib import Path
from PIL import Image
source, out = sys.argv[1], sys.argv[2]
model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32-quickgelu", pretrained="openai")
model.eval()
if Path(source, "cifar-100-python").is_dir():
    with open(Path(source, "cifar-100-python", "test"), "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    data = batch["data"] if "data" in batch else batch[b"data"]
    images = (Image.fromarray(a) for a in data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
else:
    files = sorted(p for p in Path(source).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
    images = (Image.open(p).convert("RGB") for p in files)
feats, batch = [], []
with torch.no_grad():
    for im in images:
        batch.append(preprocess(im))
        if len(batch) == 64:
            feats.append(model.encode_image(torch.stack(batch)))
            batch = []
    if batch:
        feats.append(model.encode_image(torch.stack(batch)))
np.save(out, torch.nn.functional.normalize(torch.cat(feats), dim=-1).numpy())
'''


TIME = "/usr/bin/time"  # GNU time: the child's peak RSS (ru_maxrss seen from a small parent; ours is large)


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        here = todo.pop()
        try:
            for task in os.listdir(f"/proc/{here}/task"):
                with open(f"/proc/{here}/task/{task}/children") as f:
                    kids = [int(k) for k in f.read().split()]
                out += kids
                todo += kids
        except (OSError, ValueError):
            pass
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return 0


PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
TREE_EVERY = 0.02  # seconds between samples of the process tree's memory


class TreePeak:
    """The largest sum of resident memory over a process's descendants (a command and the helpers it starts, such
    as cliplens' first-run tower helper), sampled every 20 ms on a thread: a lower bound of the true peak."""

    def __init__(self, pid: int, *, itself: bool = False):
        import threading

        self.pid, self.itself, self.peak, self._stop = pid, itself, 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            pids = [self.pid, *_descendants(self.pid)] if self.itself else _descendants(self.pid)
            self.peak = max(self.peak, sum(_rss(p) for p in pids))
            self._stop.wait(TREE_EVERY)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 2**20


def run_once(argv: list[str], env: dict, *, ready_port: int | None = None, timeout: float = 300.0,
             tree: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one process; with ``ready_port``: seconds until it answers HTTP there.

    Peak RSS comes from GNU time when installed (Linux keeps a parent's peak in a forked child's ru_maxrss, so
    this process, which holds a model, cannot read it itself); else from ``wait4`` (then an upper bound). That is
    the largest single process; ``tree`` (a dict) also gets "peak_mb": the sampled peak of the sum over every
    process the command started (:class:`TreePeak`; on Linux).
    """
    import signal
    import tempfile

    with tempfile.NamedTemporaryFile(prefix="cliplens-rss-", suffix=".txt") as rss_file:
        wrap = [TIME, "-f", "%M", "-o", rss_file.name] if os.path.exists(TIME) else []
        t0 = time.perf_counter()
        proc = subprocess.Popen(wrap + argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        # GNU time's own few MiB are not the command's: with it, count what it started
        watch = TreePeak(proc.pid, itself=not wrap) if tree is not None and os.path.isdir("/proc") else None
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
        if watch is not None:
            tree["peak_mb"] = watch.stop()
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


def alternate(variants: dict[str, tuple], *, reps: int, serve: bool = False, warmup: bool = True) -> dict:
    """variant -> {"wall": Stats, "rss": median MiB}; one warm-up each (unless ``warmup`` is False), then A B A B.

    A variant is ``(argv, env)`` or ``(argv, env, fresh)``: ``fresh`` lists what the benchmark made that is
    removed before each run of it (an index folder or database to build from nothing every time).
    """
    walls: dict[str, list[float]] = {k: [] for k in variants}
    peaks: dict[str, list[float]] = {k: [] for k in variants}
    trees: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(reps + 1 if warmup else reps):
        for name, (argv, env, *fresh) in variants.items():
            for path in (fresh[0] if fresh else ()):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            port = free_port() if serve else None
            cmd = [a.replace("{port}", str(port)) for a in argv] if serve else argv
            tree: dict = {}
            wall, peak = run_once(cmd, env, ready_port=port, tree=tree)
            if rep or not warmup:  # the first round warms up
                walls[name].append(wall)
                peaks[name].append(peak)
                trees[name].append(max(tree.get("peak_mb", 0.0), peak))  # sampling can miss the top of one
    return {k: {"wall": Stats.of(walls[k]), "rss": statistics.median(peaks[k]), "walls": walls[k],
                "rss_all": peaks[k], "tree": statistics.median(trees[k]), "tree_all": trees[k]} for k in variants}


def prepare(workdir: Path, info, *, photos: int, library: int, cifar_sizes: tuple[int, ...]) -> dict[str, Path]:
    """The 10k-item index, a photo folder, a photo library of 0.3-12 MP and CIFAR splits."""
    from PIL import Image

    from bench.data import smooth_images, write_cifar100
    from bench.process_data import make_labelled_index

    paths = {"index": workdir / "index10k", "photos": workdir / "photos", "photos_index": workdir / "photos-index",
             "library": workdir / "library"}
    make_labelled_index(paths["index"], info, 10_000, data_dir=workdir / "cifar10k")
    paths["photos"].mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(smooth_images(photos, (480, 640), seed=7)):
        Image.fromarray(a).save(paths["photos"] / f"photo_{i:03d}.jpg", quality=85)
    if library:
        from bench.photo_library import build_library

        build_library(paths["library"], library)
    for n in cifar_sizes:
        paths[f"cifar{n}"] = write_cifar100(workdir / f"cifar{n}", n).parent
    paths["cifar"] = paths[f"cifar{cifar_sizes[0]}"]
    paths["cifar_index"] = workdir / "cifar-index"
    return paths


def _rclip(workdir: Path, standin, rclip: str | None):
    """(rclip executable, its exported models) when rclip is installed (bench/rclip_ref.py), else None."""
    try:
        rclip = rclip_ref.find_rclip(rclip)
    except FileNotFoundError:
        return None
    return rclip, rclip_ref.export(standin, workdir / "rclip-models")


def run(*, info, workdir: Path, reps: int, command: str, before_src: Path | None = None, photos: int = 200,
        library: int = 200, cifar_sizes: tuple[int, ...] = (256, 2000), heavy_reps: int | None = None,
        standin=None, rclip: str | None = None) -> Report:
    src = Path(__file__).resolve().parents[1] / "src"
    base = {**os.environ, "CLIPLENS_HOME": str(workdir / "home")}  # its own caches (sha256, ONNX)
    base.pop("PYTHONDONTWRITEBYTECODE", None)  # users' Pythons keep compiled modules: so do these runs
    env = {**base, "PYTHONPATH": str(src)}
    env_torch = {**env, "CLIPLENS_IMAGE_ONLY": "0"}  # exact mode on the torch tower, the image-only cache unused
    env_before = {**base, "PYTHONPATH": str(before_src)} if before_src else None
    heavy_reps = heavy_reps or reps
    paths = prepare(workdir, info, photos=photos, library=library, cifar_sizes=cifar_sizes)
    ours = _cliplens(src)
    before = _cliplens(before_src) if before_src else None
    reference = [sys.executable, "-c", REFERENCE_INDEX]
    rc = _rclip(workdir, standin, rclip) if standin is not None else None
    # Build the photo and CIFAR indexes once (and the caches: image-only by the first exact index run, text-only by
    # a first text search): real runs.
    for argv in (["index", str(paths["photos"]), "--index-dir", str(paths["photos_index"]), "-q"],
                 ["index", "cifar100", "--data-dir", str(paths["cifar"]), "--no-verify", "--index-dir",
                  str(paths["cifar_index"]), "-q"],
                 ["search", "tractor", "--index-dir", str(paths["index"])]):
        subprocess.run(ours + argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    anchors: dict[str, dict] = {"one-shot text query, 10k index": {
        "open_clip script": ([sys.executable, "-c", REFERENCE_QUERY, str(paths["index"]), "tractor"], env)}}
    if rc is not None:
        exe, models = rc
        renv = rclip_ref.rclip_env(workdir / "rclip-photos", models, base=base)
        rclip_index = rclip_ref.index_argv(paths["photos"], rclip=exe)
        subprocess.run(rclip_index, env=renv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        anchors["one-shot text query, 10k index"]["rclip 3.3.0 (200-photo index)"] = (
            rclip_ref.query_argv(paths["photos"], rclip=exe), renv)
        anchors["re-index an unchanged folder"] = {"rclip 3.3.0 (and a query)": (rclip_index, renv)}
    cases = {
        "one-shot text query, 10k index": ["search", "tractor", "--index-dir", str(paths["index"])],
        "re-index an unchanged folder": ["index", str(paths["photos"]), "--index-dir", str(paths["photos_index"]),
                                         "-q"],
        "re-index an unchanged CIFAR split": ["index", "cifar100", "--data-dir", str(paths["cifar"]), "--no-verify",
                                              "--index-dir", str(paths["cifar_index"]), "-q"],
        "info": ["info", "--index-dir", str(paths["index"])],
        "--help": ["--help"],
        "serve: ready to answer": ["serve", "--index-dir", str(paths["index"]), "--port", "{port}"],
    }
    # Whole indexing runs, from nothing each time: ours exact and fast beside open_clip's pipeline (and rclip)
    heavy: dict[str, dict] = {}
    fresh_index = workdir / "fresh-index"
    if library:
        case = f"index {library} photos of 0.3-12 MP, new index"
        heavy[case] = {
            "cliplens exact": (ours + ["index", str(paths["library"]), "--index-dir", str(fresh_index), "-q"], env,
                               [fresh_index]),
            "cliplens exact, torch tower": (ours + ["index", str(paths["library"]), "--index-dir", str(fresh_index),
                                                    "-q"], env_torch, [fresh_index]),
            "cliplens fast": (ours + ["index", str(paths["library"]), "--index-dir", str(fresh_index), "-q",
                                      "--precision", "fast"], env, [fresh_index]),
            "open_clip script": (reference + [str(paths["library"]), str(workdir / "ref.npy")], env)}
        if rc is not None:
            lenv = rclip_ref.rclip_env(workdir / "rclip-library", models, base=base)
            heavy[case]["rclip 3.3.0 (and a query)"] = (rclip_ref.index_argv(paths["library"], rclip=exe), lenv,
                                                         [rclip_ref.database(lenv)])
        # A model's first run on a machine: no caches at all (the image-only tower, the weights' sha256), each time
        first_home = workdir / "first-home"
        fenv = {**env, "CLIPLENS_HOME": str(first_home)}
        first = f"index {library} photos, a model's first run (no cliplens caches)"
        heavy[first] = {
            "cliplens exact, first run": (ours + ["index", str(paths["library"]), "--index-dir", str(fresh_index),
                                                  "-q"], fenv, [fresh_index, first_home]),
            "cliplens fast, first run": (ours + ["index", str(paths["library"]), "--index-dir", str(fresh_index),
                                                 "-q", "--precision", "fast"], fenv, [fresh_index, first_home])}
        if rc is not None:
            heavy[first]["rclip 3.3.0 (and a query)"] = heavy[case]["rclip 3.3.0 (and a query)"]
    for n in cifar_sizes:
        data = ["index", "cifar100", "--data-dir", str(paths[f"cifar{n}"]), "--no-verify", "--index-dir",
                str(fresh_index), "-q"]
        heavy[f"index {n} CIFAR images, new index"] = {
            "cliplens exact": (ours + data, env, [fresh_index]),
            "cliplens exact, torch tower": (ours + data, env_torch, [fresh_index]),
            "cliplens fast": (ours + data + ["--precision", "fast"], env, [fresh_index]),
            "open_clip script": (reference + [str(paths[f"cifar{n}"]), str(workdir / "ref.npy")], env)}
    report = Report(name="process", title="Whole-process runs: commands as users type them (fresh process each)",
                    config={"command": command, "reps": reps, "heavy_reps": heavy_reps, "photos": photos,
                            "library": library, "cifar_sizes": list(cifar_sizes), "index_items": 10_000,
                            "rclip": rc is not None, "before_src": str(before_src) if before_src else None})
    rows, data = [], {}
    plan = [(case, {"cliplens": (ours + argv, env), **anchors.get(case, {})}, reps, True)
            for case, argv in cases.items()]
    plan += [(case, variants, heavy_reps, False) for case, variants in heavy.items()]
    for case, variants, n_reps, warmup in plan:
        if before and not case.startswith("index "):
            argv = cases[case]
            variants["cliplens before"] = (before + argv, env_before)
        res = alternate(variants, reps=n_reps, serve=case.startswith("serve"), warmup=warmup)
        data[case] = {k: {"wall": v["wall"].to_json(), "walls": v["walls"], "peak_rss_mb": v["rss"],
                          "peak_rss_mb_all": v["rss_all"], "peak_tree_rss_mb": v["tree"],
                          "peak_tree_rss_mb_all": v["tree_all"]} for k, v in res.items()}
        mine_name = next(iter(res))
        mine = res[mine_name]["wall"].median
        for name, v in res.items():
            rows.append([case, name, v["wall"].text("{:.2f}"), f"{v['rss']:.0f}", f"{v['tree']:.0f}",
                         "-" if name == mine_name else ratio(v["wall"].median, mine)])
        print(f"  {case}: " + ", ".join(f"{k} {v['wall'].median:.2f} s" for k, v in res.items()), flush=True)
    report.table(f"median wall seconds (min-max) of {reps} runs after a warm-up, A B A B (whole indexing runs: "
                 f"{heavy_reps} runs, no warm-up beyond the set-up's); peak RSS median MiB",
                 ["case", "variant", "wall s", "peak RSS MiB", "all its processes MiB",
                  "its time / ours (>1: ours faster)"], rows)
    report.data = data
    report.notes += [
        "The one-shot query reads a CIFAR-100-format index of 10,000 random unit vectors written through the real "
        "store (bench/process_data.py); the text-only tower was cached by one earlier torch search. rclip's query "
        "runs on its own index of the 200-photo folder (search cost is negligible at both sizes).",
        "rclip 3.3.0 (where installed; bench/rclip_ref.py) runs the same ViT-B/32 stand-in weights exported to its "
        "ONNX layout, offline; it has no index-only mode, so its indexing runs also answer one query.",
        "open_clip script: open_clip's own pipeline as a user writes it (its PIL eval transform per image, "
        "encode_image in batches of 64 under no_grad, normalise, np.save); ratios > 1 mean cliplens is faster.",
        "Serve: seconds from spawning `cliplens serve` to the first 200 answer of GET /api/indexes.",
        "cliplens exact: the image tower as the set-up's first exact run cached it for ONNX Runtime (no torch in the "
        "process; cliplens.imageonly); 'exact, torch tower': the same command with CLIPLENS_IMAGE_ONLY=0.",
        "Peak RSS: the largest single process (GNU time's ru_maxrss). All its processes: the largest sum over the "
        "command and every process it started (a model's first cliplens run loads torch in a helper process), "
        "sampled every 20 ms, and never below the first column.",
        "A model's first run: CLIPLENS_HOME emptied before each run (no image-only tower, no sha256 cache); rclip "
        "runs as in the case above (it keeps no cache between runs but its database, removed each time).",
        "Children run with Python's bytecode cache on (as installed packages are), whatever this shell sets.",
        "A shared 2-core machine: compare ratios from the same run, not absolute numbers across runs.",
    ]
    shutil.rmtree(workdir, ignore_errors=True)
    return report
