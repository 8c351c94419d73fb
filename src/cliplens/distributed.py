"""Distributed embedding on Ray Data: the same ``embed_into`` contract as :mod:`cliplens.embed`, run on a cluster.

    source (any BatchSource)  ->  shards of rows  ->  actor pool, one model per actor  ->  shard files  ->  store

- The source is put in Ray's object store once; a shard is a row range ``[start, stop)`` that an actor loads,
  preprocesses and encodes in the same ``batch_size`` batches as a local run, so the vectors are identical to a
  local run on the same weights and device (the float results depend on batch shapes, not on which process ran).
- Finished shards stream back to the driver, which writes each to ``shards/`` in the build's scratch folder
  atomically: no shared filesystem is needed between machines. A shard that raises is retried (``max_retries``
  times) and an actor that dies is restarted by Ray; a failed or killed run keeps every finished shard and redoes
  only the others.
- The store then merges the shards, in order, into the usual resumable ``IndexWriter``: same index format.

``ray.init()`` with no address starts a local Ray on this machine (what the tests use); ``address="auto"`` joins
the cluster this machine belongs to and ``"ray://head:10001"`` connects through Ray Client (after a quick TCP check
of that port, so an unreachable head fails in seconds, not after Ray Client's 30 s of retries).

A source may record rows it could not load in a ``failed`` dict (row -> reason), as an image folder's
``FolderSource`` does: those rows come back as zero vectors (the encoder never outputs zero, so zero means
failed) and their reasons are merged into the driver's ``source.failed``, as if the rows had been loaded there.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from cliplens._files import atomic_path, write_json_atomic
from cliplens.embed import EmbedStats
from cliplens.errors import EngineError, ModelError

log = logging.getLogger(__name__)

SHARDS = "shards"
SHARDS_META = "shards.json"
_ENV_PASSED = ("HF_HOME", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "CLIPLENS_HOME")  # what a local Ray's workers need
RAY_CLIENT_PORT = 10001  # Ray Client's default server port on the head node
CONNECT_TIMEOUT = 3.0  # seconds for the TCP check of a ray:// address


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: start a local Ray; "auto" or "ray://host:10001": use that cluster
    num_cpus: int | None = None  # local Ray only (None: every core)
    actors: int | None = None  # actor pool size (None: as many as the cluster's CPUs or GPUs allow)
    cpus_per_actor: float = 1.0
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    shard_batches: int = 16  # rows per shard = shard_batches x batch_size
    max_retries: int = 2  # times a shard that raises is tried again before the run fails


@dataclass(frozen=True)
class RayRunStats:
    shards: int
    shards_reused: int  # finished by an earlier (killed or failed) run and kept
    shards_computed: int
    actors: int
    embed_seconds: float  # Ray: from submitting the job to the last shard on disk (includes actor start-up)
    merge_seconds: float  # shard files -> store


class RayEngine:
    """``RayEngine(RayOptions(...)).embed_into`` is a drop-in for :func:`cliplens.embed.embed_into`."""

    def __init__(self, options: RayOptions | None = None):
        self.options = options or RayOptions()
        self.last_run: RayRunStats | None = None

    def embed_into(self, source, encoder, writer, *, batch_size: int, checkpoint_every: int = 4, workers: int = 2,
                   progress: bool = True, on_batch: Callable[[int], None] | None = None) -> EmbedStats:
        """Embed every row of ``source`` into ``writer`` with Ray; ``workers`` (local threads) is unused here."""
        done = writer.start()  # rows already merged into the store by an earlier run
        try:
            return self._embed_into(source, encoder, writer, done, batch_size=batch_size,
                                    checkpoint_every=checkpoint_every, progress=progress, on_batch=on_batch)
        except BaseException:
            close = getattr(writer, "close", None)
            if close is not None:
                close()  # the index folder's lock goes; finished shards and checkpoints stay
            raise

    def _embed_into(self, source, encoder, writer, done: int, *, batch_size: int, checkpoint_every: int,
                    progress: bool, on_batch) -> EmbedStats:
        t0 = time.perf_counter()
        n = len(source)
        shard_rows = max(1, self.options.shard_batches) * batch_size  # a multiple of batch_size: same batches as local
        bounds = [(i, s, min(s + shard_rows, n)) for i, s in enumerate(range(0, n, shard_rows))]
        shards = [(i, s, e) for i, s, e in bounds if e > done]
        scratch = Path(getattr(writer, "scratch", None) or writer.root)  # the build's own scratch folder
        folder = _shard_folder(scratch, writer.identity, shard_rows, encoder.info.embed_dim)
        have = {i for i, s, e in shards if _valid_shard(folder, i, e - s, encoder.info.embed_dim)}
        todo = [sh for sh in shards if sh[0] not in have]
        t1 = time.perf_counter()
        actors = 0
        if todo:
            actors = self._run(todo, source, encoder, folder, batch_size=batch_size, progress=progress)
        t2 = time.perf_counter()
        for count, (i, start, stop) in enumerate(shards, 1):  # merge, in order, resumably
            vectors = np.load(folder / _shard_name(i))
            lo = max(start, done)
            writer.write(lo, vectors[lo - start :])
            if count % checkpoint_every == 0 or stop == n:
                writer.checkpoint(stop)
            if on_batch is not None:
                on_batch(stop)
        if not shards:
            writer.checkpoint(n)
        t3 = time.perf_counter()
        shutil.rmtree(folder, ignore_errors=True)  # the writer's checkpoint now holds every row
        self.last_run = RayRunStats(shards=len(shards), shards_reused=len(shards) - len(todo),
                                    shards_computed=len(todo), actors=actors, embed_seconds=t2 - t1,
                                    merge_seconds=t3 - t2)
        log.info("ray: %d shards (%d reused) on %d actors in %.1f s, merged in %.2f s", len(shards),
                 len(shards) - len(todo), actors, t2 - t1, t3 - t2)
        return EmbedStats(count=n - done, resumed_from=done, seconds=time.perf_counter() - t0)

    # ---------------------------------------------------------------- the Ray job
    def _run(self, todo, source, encoder, folder: Path, *, batch_size: int, progress: bool) -> int:
        import ray

        started = connect_ray(self.options)
        try:
            opts = self.options
            resources = ray.cluster_resources()
            gpus = opts.gpus_per_actor
            if gpus is None:
                gpus = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
            capacity = (resources.get("GPU", 0) / gpus) if gpus else (resources.get("CPU", 1) / opts.cpus_per_actor)
            actors = max(1, min(len(todo), opts.actors or int(capacity) or 1))
            spec = _encoder_spec(encoder, device="cuda" if gpus else "cpu")
            failure = _stream_shards(todo, source, spec, folder, actors=actors, gpus=gpus, batch_size=batch_size,
                                     options=opts, progress=progress)
            if failure:  # raised here, outside the job's frames: nothing keeps its actors (and their CPUs) alive
                raise EngineError(f"the Ray job failed ({failure}); finished shards are kept in {folder}: "
                                  "run the same command again to redo only the missing ones")
            return actors
        finally:
            if started:
                ray.shutdown()


def _stream_shards(todo, source, spec: dict, folder: Path, *, actors: int, gpus: float, batch_size: int,
                   options: RayOptions, progress: bool) -> str | None:
    """Run the shards through an actor pool, writing each result as it arrives; returns an error line or None."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext
    from tqdm import tqdm

    ctx = DataContext.get_current()  # the driver's global context: changed for this job only, restored below
    saved = {k: getattr(ctx, k) for k in ("enable_progress_bars", "print_on_execution_start") if hasattr(ctx, k)}
    for key in saved:  # our progress bar counts images; no "Starting execution" lines on the console
        setattr(ctx, key, False)
    rows = [{"shard": i, "start": s, "stop": e} for i, s, e in todo]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        _ShardEmbedder, batch_size=1, zero_copy_batch=True,
        compute=ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
        fn_constructor_kwargs={"spec": spec, "source": ray.put(source), "batch_size": batch_size,
                               "retries": options.max_retries},
        num_cpus=options.cpus_per_actor, num_gpus=gpus or None,
    )
    bar = tqdm(total=sum(e - s for _, s, e in todo), unit="img", desc=f"embedding (ray, {actors} actors)",
               disable=not progress, dynamic_ncols=True)
    try:
        for batch in ds.iter_batches(batch_size=1, batch_format="numpy"):
            i, vectors = int(batch["shard"][0]), np.asarray(batch["vectors"][0], dtype=np.float32)
            with atomic_path(folder / _shard_name(i)) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, vectors)
            failed = json.loads(str(batch["failed"][0]))
            if failed and isinstance(getattr(source, "failed", None), dict):
                source.failed.update({int(row): reason for row, reason in failed.items()})
            bar.update(len(vectors))
    except ray.exceptions.RayError as exc:
        return _first_line(exc)
    finally:
        bar.close()
        for key, value in saved.items():
            setattr(ctx, key, value)
    return None


class _ShardEmbedder:
    """A Ray Data actor: loads one model, then turns shard descriptors into vectors.

    A shard that raises is tried again here, up to ``retries`` times, before the error fails the job. (Ray itself
    restarts an actor that dies, e.g. killed or out of memory, and resubmits its shard: Ray Data's defaults.)
    """

    def __init__(self, spec: dict, source, batch_size: int, retries: int):
        import ray

        from cliplens.encoder import load_encoder

        self.encoder = load_encoder(spec["model"], spec["pretrained"], weights=spec["weights"], device=spec["device"])
        if self.encoder.info.weights_sha256 != spec["sha256"]:
            raise ModelError(f"a Ray worker loaded other weights for {spec['model']} (sha256 "
                             f"{self.encoder.info.weights_sha256}, the driver has {spec['sha256']})")
        self.source = ray.get(source) if isinstance(source, ray.ObjectRef) else source
        self.batch_size = batch_size
        self.retries = max(0, int(retries))

    def __call__(self, batch: dict) -> dict:
        shard, start, stop = (int(batch[c][0]) for c in ("shard", "start", "stop"))
        for attempt in range(self.retries + 1):
            try:
                vectors = self._embed(start, stop)
                break
            except Exception as exc:  # any failure of this shard: data, decoding, a transient I/O error
                if attempt == self.retries:
                    raise
                log.warning("shard %d (rows %d..%d) failed (%s: %s); retrying", shard, start, stop,
                            type(exc).__name__, exc)
        recorded = getattr(self.source, "failed", None)  # rows the source could not load (an image folder's)
        failed = {i: r for i, r in recorded.items() if start <= i < stop} if isinstance(recorded, dict) else {}
        if failed:
            vectors[[i - start for i in failed]] = 0  # zero = failed, also in the shard file a later run reuses
        return {"shard": np.array([shard]), "vectors": vectors[None], "failed": np.array([json.dumps(failed)])}

    def _embed(self, start: int, stop: int) -> np.ndarray:
        enc, bs = self.encoder, self.batch_size
        return np.concatenate([enc.encode_pixels(enc.preprocess(self.source.load(s, min(s + bs, stop))))
                               for s in range(start, stop, bs)])


# --------------------------------------------------------------------------- helpers


def connect_ray(options: RayOptions) -> bool:
    """Connect to (or start) Ray unless the caller already did; True when we started it (and so shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    check_ray_address(options.address)
    kwargs = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
    try:
        if options.address:
            ray.init(address=options.address, **kwargs)
        else:
            env = {k: os.environ[k] for k in _ENV_PASSED if k in os.environ}
            ray.init(num_cpus=options.num_cpus, runtime_env={"env_vars": env} if env else None, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = options.address or "a local Ray"
        raise EngineError(f"cannot start or reach {where} ({_first_line(exc)}): check the Ray address "
                          "(auto, or ray://HEAD:10001) and that the cluster runs this Ray version",
                          fix={"ray_address": None}) from None
    return True


def check_ray_address(address: str | None, *, timeout: float = CONNECT_TIMEOUT) -> None:
    """For a ``ray://host:port`` address, a TCP connect to that port: EngineError within ``timeout`` seconds if
    nothing listens there (Ray Client itself retries for 30 s before giving up). Other addresses are left to Ray."""
    if not address or not address.strip().lower().startswith("ray://"):
        return
    from urllib.parse import urlsplit

    address = address.strip()
    try:
        parts = urlsplit(address)
        host, port = parts.hostname, parts.port or RAY_CLIENT_PORT
    except ValueError as exc:
        raise EngineError(f"bad Ray address {address!r} ({exc}): use ray://HOST:PORT, "
                          "e.g. ray://head:10001", fix={"ray_address": None}) from None
    if not host:
        raise EngineError(f"bad Ray address {address!r} (no host): use ray://HOST:PORT, e.g. ray://head:10001",
                          fix={"ray_address": None})
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
        raise EngineError(f"cannot reach the Ray cluster at {address} ({reason} within {timeout:g} s): start the head "
                          f"with `ray start --head --ray-client-server-port {port}`, or fix the Ray address "
                          "(ray://HEAD:PORT, or auto on a cluster node)", fix={"ray_address": None}) from None


def _encoder_spec(encoder, *, device: str) -> dict:
    """How an actor rebuilds the driver's model: by tag or hub name, else from the same weights file."""
    info = encoder.info
    hub = info.name.startswith(("hf-hub:", "local-dir:"))
    weights = None if (hub or info.pretrained) else info.weights_path
    if not hub and not info.pretrained and weights is None:
        raise EngineError("the Ray engine cannot reproduce a model with random weights: give a weights file or a "
                          "pretrained tag", fix={"weights": None, "pretrained": None})
    return {"model": info.name, "pretrained": info.pretrained, "weights": weights, "device": device,
            "sha256": info.weights_sha256}


def _shard_folder(root: Path, identity: dict, shard_rows: int, dim: int) -> Path:
    """``root/shards``, emptied unless it holds shards of exactly this job (same identity and shard size)."""
    folder = root / SHARDS
    meta = {"identity": identity, "shard_rows": shard_rows, "dim": dim}
    try:
        same = json.loads((folder / SHARDS_META).read_text()) == json.loads(json.dumps(meta))
    except (OSError, ValueError):
        same = False
    if not same:
        if folder.exists():
            log.warning("discarding shards in %s from a run with other settings", folder)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        write_json_atomic(folder / SHARDS_META, meta)
    for stale in folder.glob(".*.tmp"):  # a shard being written when the driver was killed
        stale.unlink(missing_ok=True)
    return folder


def _shard_name(i: int) -> str:
    return f"shard-{i:06d}.npy"


def _valid_shard(folder: Path, i: int, rows: int, dim: int) -> bool:
    try:
        arr = np.load(folder / _shard_name(i), mmap_mode="r")
    except (OSError, ValueError):
        return False
    return arr.shape == (rows, dim) and arr.dtype == np.float32


_RAISED = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)): (.+)$")  # "pkg.SomeError: message"


def _first_line(exc: BaseException) -> str:
    """The reason of a failure in one line. Ray wraps a worker's exception in traceback text whose last lines are
    its own advice; the worker's "pkg.SomeError: message" line, the first one not from Ray, is the reason."""
    text = str(exc).strip()
    for line in text.splitlines():
        raised = _RAISED.match(line.strip())
        if raised and not raised.group(1).startswith("ray."):
            return f"{raised.group(1).rsplit('.', 1)[-1]}: {raised.group(2)}"[:400]
    return (text.splitlines()[-1] if text else type(exc).__name__)[:200]
