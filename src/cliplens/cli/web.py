"""Your own images in a browser: ``cliplens serve`` (indexing a folder is ``cliplens index FOLDER``, in core)."""

from __future__ import annotations

import errno
import logging
import signal
from pathlib import Path

from cliplens._safe import printable
from cliplens.errors import CliplensError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- serve


def _unique_names(dirs: list[Path]) -> list[str]:
    names: list[str] = []
    for d in dirs:
        base = d.resolve().name or "index"
        name, n = base, 2
        while name in names:
            name, n = f"{base}-{n}", n + 1
        names.append(name)
    return names


def build_searchers(args) -> dict:
    """Open every ``--index-dir``; load each distinct model once, shared by the indexes built with it.

    ``--backend`` (default exact) opens that backend over each index (a FAISS index built beside each, or one
    Milvus collection per index folder unless ``--milvus-collection`` names one for a single index).
    """
    from cliplens.cli.common import default_index_dir
    from cliplens.cli.scale import open_backend
    from cliplens.search import Searcher
    from cliplens.store import IndexStore

    dirs = [Path(d).expanduser() for d in (args.index_dir or [default_index_dir()])]
    stores = [IndexStore.open(d) for d in dirs]
    if getattr(args, "milvus_collection", None) and len(stores) > 1:
        raise CliplensError("--milvus-collection names one collection, but several --index-dir are served: "
                            "leave it out (each index then uses cliplens_<its folder name>)")
    indexes = [open_backend(store, args) for store in stores]  # a backend that is missing fails before any model loads
    encoders: dict[tuple, object] = {}
    searchers = {}
    for name, store, index in zip(_unique_names(dirs), stores, indexes):
        m = store.manifest.model
        key = (m.name, m.weights_sha256, args.model, args.pretrained, str(args.weights))
        if key not in encoders:
            encoders[key] = serve_encoder(args, store.manifest)
        searchers[name] = Searcher(encoder=encoders[key], store=store, index=index)
    return searchers


def serve_encoder(args, manifest: dict):
    """Text queries from the torch-free text tower (no torch at start-up), images from the full model when first
    asked for; the full model at once where there is no such tower (no ONNX Runtime, random weights, a GPU)."""
    from cliplens import textonly
    from cliplens.cli import common
    from cliplens.cli.common import text_only_encoder
    from cliplens.textfirst import TextFirstEncoder

    text = text_only_encoder(args, manifest, prepack=True)
    if text is not None:
        return TextFirstEncoder(text, lambda: common.load_model(args, manifest))
    full = common.load_model(args, manifest)
    if getattr(args, "device", "auto") in ("auto", "cpu") and str(full.device) == "cpu" and textonly.build_cache(full):
        text = text_only_encoder(args, manifest, prepack=True)  # built now: the next start needs no torch
        if text is not None:
            return TextFirstEncoder(text, lambda: full, full=full)
    return full


def cmd_serve(args) -> int:
    try:
        import uvicorn

        from cliplens.web import create_app
    except ImportError as exc:
        raise CliplensError(f"serving needs the web extras ({exc.name} is missing): "
                            "pip install 'cliplens[web]'") from None
    if not 0 <= args.port <= 65535:
        raise CliplensError(f"--port must be 0..65535, got {args.port}")
    from cliplens.web.app import LOOPBACK_HOSTS

    sock = _listen(args.host, args.port)  # "address in use" is said now, before anything claims to serve
    try:
        searchers = build_searchers(args)  # the models load here, once, before the first request
        # the names a browser may use for this server: loopback, the address it listens on, and --allow-host
        hosts = (*LOOPBACK_HOSTS, *([args.host] if args.host not in ("0.0.0.0", "::", "") else []),
                 *args.allow_host)
        app = create_app(searchers, allowed_hosts=hosts)
        port = sock.getsockname()[1]
        listing = ", ".join(f"{printable(n)} ({len(s.store)} images)" for n, s in searchers.items())
        print(f"serving {listing} on http://{args.host}:{port}/ (Ctrl-C stops)", flush=True)
        if args.host not in LOOPBACK_HOSTS:
            log.warning("listening on %s: anyone who can reach this machine can search these indexes", args.host)
        config = uvicorn.Config(app, log_level="info" if args.verbose else "warning", access_log=bool(args.verbose))
        # uvicorn shuts down on SIGTERM, then raises the signal again with the handler it found: with Python's
        # default one the process would die there, before atexit stops what serve started (an embedded
        # PostgreSQL server, say). This handler turns that second SIGTERM into a normal exit instead.
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            signal.signal(signal.SIGTERM, previous)
    finally:
        sock.close()
    return 0


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(0)


def _listen(host: str, port: int):
    """A listening TCP socket on (host, port), or CliplensError in one line (in use, not an address here)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CliplensError(f"--host {host!r} is not an address of this machine ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart can reuse the port
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise CliplensError(f"port {port} on {host} is already in use (another `cliplens serve`?): "
                                "stop it, or pass --port with a free port (0 picks one)") from None
        raise CliplensError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    sock.set_inheritable(True)
    return sock


def register(sub) -> None:
    from cliplens.cli.common import add_model_flags
    from cliplens.cli.scale import add_backend_flags

    p = sub.add_parser("serve", help="web page + JSON API over one or more indexes",
                       description="Serve indexes over HTTP: a search page at / and a JSON API under /api "
                                   "(OpenAPI at /openapi.json). The model loads once at start-up.")
    p.add_argument("--index-dir", type=Path, action="append", default=None, metavar="DIR",
                   help="an index to serve (repeat for several; the first is the default)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests for this host name (repeatable); by default only loopback names "
                        "and the --host address are answered, which stops DNS-rebinding pages")
    add_model_flags(p, for_query=True)
    add_backend_flags(p)
    p.set_defaults(handler=cmd_serve)
