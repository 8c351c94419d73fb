"""Load check for ``cliplens serve``: N concurrent clients on loopback for a bounded time.

Starts a real server (a subprocess, 127.0.0.1, a free port) on an index, then runs two phases of
``--seconds`` each with ``--clients`` threads, each holding one keep-alive HTTP connection:

- ``unique``: every request is a text query never seen before, so each one goes through the text encoder
  (the server merges concurrent ones into one forward pass);
- ``repeat``: queries drawn from 100 class names, so after the first few the encoder's text cache answers
  and the phase measures the rest of the stack (HTTP, JSON, the exact search).

It prints requests/s, p50/p99 latency and the error count (must be 0) per phase, and the server's batching
counters. Without ``--index-dir`` it builds a stand-in index first (random weights, real loading path, offline):
``--model tiny`` (a 2-layer CLIP, harness smoke test) or ``--model b32`` (the real ViT-B-32-quickgelu
architecture, so the text encoder costs what it costs with OpenAI's weights).

    python bench/load_web.py [--model tiny|b32] [--index-dir DIR] [--clients 16] [--seconds 10] [--k 10]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADJECTIVES = ("red", "small", "old", "wet", "bright", "dark", "blurry", "happy", "wooden", "distant", "green",
              "tiny", "big", "striped", "shiny", "sleepy")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_standin_index(work: Path, model: str, per_class: int) -> Path:
    """A CIFAR-100-format fixture set indexed with a random-weight model in a private, offline HF cache."""
    sys.path.insert(0, str(ROOT / "tests"))
    import cifar_fixture
    import model_fixture

    hf_home = Path(os.environ["HF_HOME"])
    if model == "tiny":
        name, pretrained = model_fixture.write_tiny_model(hf_home), None
    else:
        model_fixture.write_openai_b32(hf_home)
        name, pretrained = "ViT-B-32-quickgelu", "openai"
    from cliplens.sources import load_cifar
    from cliplens.embed import index_labeled
    from cliplens.encoder import load_encoder

    data_dir = work / "cifar"
    cifar_fixture.make_cifar100(data_dir, per_class_test=per_class, per_class_train=1, seed=0, archive=False,
                                folder=True)
    data = load_cifar("cifar100", "test", data_dir=data_dir, verify=False, progress=False)
    out = work / "index"
    index_labeled(data, load_encoder(name, pretrained, device="cpu"), out, batch_size=64, progress=False)
    return out


def start_server(index_dir: Path, port: int, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "cliplens", "serve", "--index-dir", str(index_dir),
                             "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit(f"the server did not start; its log:\n{log_path.read_text()[-3000:]}")


def run_phase(port: int, clients: int, seconds: float, k: int, classes: list[str], unique: bool) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(10**9))
    stop_at = time.perf_counter() + seconds

    def client(seed: int) -> None:
        rnd = random.Random(seed)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine, bad = [], []
        while time.perf_counter() < stop_at:
            cls = rnd.choice(classes)
            q = f"{rnd.choice(ADJECTIVES)} {cls} number {next(counter)}" if unique else cls
            path = "/api/search?" + urllib.parse.urlencode({"q": q, "k": k})
            t0 = time.perf_counter()
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 200 or not json.loads(body).get("hits"):
                    bad.append(f"{resp.status}: {body[:200]!r}")
            except (OSError, http.client.HTTPException, ValueError) as exc:
                bad.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            mine.append(time.perf_counter() - t0)
        conn.close()
        with lock:
            latencies.extend(mine)
            errors.extend(bad)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 120)
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {"requests": len(lat), "seconds": wall, "rps": len(lat) / wall,
            "p50_ms": 1000 * statistics.median(lat) if lat else float("nan"),
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan"),
            "max_ms": 1000 * lat[-1] if lat else float("nan"), "errors": len(errors), "first_errors": errors[:3]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "b32"], default="tiny", help="stand-in model (without --index-dir)")
    parser.add_argument("--index-dir", type=Path, default=None, help="serve this index instead (its own model)")
    parser.add_argument("--per-class", type=int, default=2, help="stand-in index: images per class (x100)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    parser.add_argument("-k", "--k", type=int, default=10)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cliplens-load-") as tmp:
        work = Path(tmp)
        if args.index_dir is None:  # private offline caches, set before anything imports huggingface_hub
            os.environ.update(HF_HOME=str(work / "hf"), HF_HUB_OFFLINE="1", CLIPLENS_HOME=str(work / "home"))
        sys.path.insert(0, str(ROOT / "src"))
        t0 = time.perf_counter()
        index_dir = args.index_dir or build_standin_index(work, args.model, args.per_class)
        built = time.perf_counter() - t0
        from cliplens.store import IndexStore

        store = IndexStore.open(index_dir)
        classes = [c.replace("_", " ") for c in store.class_names] or ["photo", "dog", "cat", "car", "tree"]
        port = free_port()
        proc = start_server(index_dir, port, work / "server.log")
        try:
            m = store.manifest.model
            print(f"server: {m.name} ({'random stand-in weights' if args.index_dir is None else 'index model'}), "
                  f"{len(store)} images, http://127.0.0.1:{port}, {os.cpu_count()} CPUs"
                  + (f"; stand-in index built in {built:.1f} s" if args.index_dir is None else ""))
            print(f"{args.clients} clients, {args.seconds:g} s per phase, GET /api/search k={args.k}\n")
            print(f"{'phase':<8}{'requests':>9}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'errors':>8}")
            failed = 0
            for name, unique in (("unique", True), ("repeat", False)):
                r = run_phase(port, args.clients, args.seconds, args.k, classes, unique)
                print(f"{name:<8}{r['requests']:>9}{r['rps']:>9.1f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}"
                      f"{r['max_ms']:>9.1f}{r['errors']:>8}")
                for e in r["first_errors"]:
                    print(f"    error: {e}")
                failed += r["errors"]
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/healthz")
            health = json.loads(conn.getresponse().read())
            for svc in health.get("encoders", []):
                print(f"\nserver text batching: {svc['texts']} texts in {svc['text_calls']} encoder calls "
                      f"(largest merge: {svc['largest_batch']} requests)")
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
