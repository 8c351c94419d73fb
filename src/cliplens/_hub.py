"""Where weights and data come from when they are not on disk yet: the Hugging Face hub cache, and one quick
check that the internet is there at all.

Without this, a machine with no network and no ``HF_HUB_OFFLINE=1`` spends about a minute in huggingface_hub's
retries (5 per file, two files, backing off to 8 s) and prints two dozen warnings before open_clip gives up. Here
a cached checkpoint is found without any network call, and otherwise one TCP connect (3 s at most, once per host
per process) decides whether a download is worth trying.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

HF_WEIGHTS = "open_clip_pytorch_model.bin"  # open_clip's default file name in a hub repo
HF_SAFE_WEIGHTS = "open_clip_model.safetensors"  # preferred by open_clip when the repo has it
PROBE_SECONDS = 3.0


def split_hub_name(hf_hub: str) -> tuple[str, str]:
    """open_clip's ``"org/repo/file"`` (or ``"org/repo/"`` for the default file) -> (repo id, file name)."""
    repo, filename = os.path.split(hf_hub)
    return repo, filename or HF_WEIGHTS


def hub_candidates(filename: str) -> tuple[str, ...]:
    """The files open_clip tries for ``filename``, in its order: the safetensors twin first."""
    if filename == HF_WEIGHTS:
        return HF_SAFE_WEIGHTS, filename
    if filename.endswith((".bin", ".pth")):
        return filename[:-4] + ".safetensors", filename
    return (filename,)


def cached_checkpoint(hf_hub: str) -> str | None:
    """The local path of a hub checkpoint already in the cache (honours HF_HOME / HF_HUB_CACHE), or None.

    No network call: this is what lets a machine that has the weights start without asking the hub anything.
    """
    from huggingface_hub import try_to_load_from_cache

    repo, filename = split_hub_name(hf_hub)
    for name in hub_candidates(filename):
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str) and Path(found).is_file():
            return found
    return None


def hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def offline_requested() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def reachable(url: str, timeout: float = PROBE_SECONDS) -> bool:
    """True when a TCP connection to ``url``'s host opens within ``timeout`` seconds (name lookup included)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return _reachable(parts.hostname or "", port, timeout)


@functools.lru_cache(maxsize=None)
def _reachable(host: str, port: int, timeout: float) -> bool:
    if not host:
        return False
    answer: list[bool] = []

    def probe() -> None:  # in a thread: a name lookup cannot be given a timeout of its own
        try:
            with socket.create_connection((host, port), timeout=timeout):
                answer.append(True)
        except OSError:
            answer.append(False)

    worker = threading.Thread(target=probe, daemon=True, name="cliplens-net-probe")
    worker.start()
    worker.join(timeout + 0.5)
    return bool(answer and answer[0])


def hub_reachable() -> bool:
    """False at once under HF_HUB_OFFLINE=1, else whether the hub's host answers (checked once per process)."""
    return not offline_requested() and reachable(hub_endpoint())


def download_command(hf_hub: str) -> str:
    """The command that fetches this checkpoint on a connected machine, for the installed huggingface_hub."""
    repo, filename = split_hub_name(hf_hub)
    return f"hf download {repo} {hub_candidates(filename)[0]}"


def missing_weights_message(label: str, hf_hub: str) -> str:
    repo, _ = split_hub_name(hf_hub)
    why = "HF_HUB_OFFLINE=1 is set" if offline_requested() else f"{urlsplit(hub_endpoint()).hostname} cannot be reached"
    return (f"the weights for {label} are not in the Hugging Face cache ({hub_cache_dir()}) and {why}: "
            f"on a connected machine run `{download_command(hf_hub)}`, copy its "
            f"models--{repo.replace('/', '--')} folder into this machine's cache (or set HF_HOME), "
            "or pass --weights PATH to a checkpoint file")


@contextlib.contextmanager
def quiet_hub():
    """Silence huggingface_hub's and urllib3's retry warnings for the duration (our own error says it once)."""
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "urllib3")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
