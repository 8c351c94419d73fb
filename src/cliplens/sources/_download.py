"""Hashing, downloading and safe extraction of data set archives.

Both the download and the extraction write into a temporary name in the destination folder and
rename at the end, so an interrupted run never leaves a half archive or a half folder that a
later run would mistake for a complete one.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import logging
import os
import posixpath
import shutil
import tarfile
import tempfile
import urllib.error
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cliplens.errors import ChecksumError, DatasetError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20  # 1 MiB: hashing and downloading both stream in pieces this size


def file_digests(path: Path) -> dict[str, Any]:
    """md5 (to compare with the published sums), sha256 (for the record) and size in bytes."""
    md5, sha256, size = hashlib.md5(), hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            md5.update(chunk)
            sha256.update(chunk)
            size += len(chunk)
    return {"md5": md5.hexdigest(), "sha256": sha256.hexdigest(), "size": size}


def bytes_digests(data: bytes, pool) -> Callable[[], dict[str, Any]]:
    """:func:`file_digests` of bytes already read, md5 and sha256 each on one of ``pool``'s threads (hashlib lets
    go of the GIL on large inputs), so the caller can work meanwhile: call the result for the same dict."""
    md5, sha256 = (pool.submit(lambda h: h(data).hexdigest(), h) for h in (hashlib.md5, hashlib.sha256))
    return lambda: {"md5": md5.result(), "sha256": sha256.result(), "size": len(data)}


def checksum_error(label: str, actual: str, expected: str) -> ChecksumError:
    return ChecksumError(
        f"{label}: md5 {actual} is not the official {expected} (truncated, altered or not the "
        "official file); re-download it, or pass --no-verify to index a custom CIFAR-format set"
    )


def download(
    url: str,
    dest: Path,
    *,
    opener: Callable[..., Any],
    expected_md5: str | None,
    progress: bool,
) -> str:
    """Fetch ``url`` to ``dest`` and return its md5; on a failure or an md5 other than
    ``expected_md5`` (when given) nothing is left behind."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    md5 = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with opener(url, timeout=60) as response:
                    headers = getattr(response, "headers", None)
                    total = headers.get("Content-Length") if headers else None
                    with tqdm(
                        total=int(total) if total else None,
                        unit="B",
                        unit_scale=True,
                        desc=dest.name,
                        disable=not progress,
                    ) as bar:
                        while chunk := response.read(_CHUNK):
                            out.write(chunk)
                            md5.update(chunk)
                            bar.update(len(chunk))
            # URLError, timeouts and resets are OSErrors; a short body is an HTTPException
            except (OSError, ValueError, http.client.HTTPException) as exc:
                if isinstance(exc, urllib.error.HTTPError):
                    reason = f"HTTP {exc.code} {exc.reason}"
                else:
                    reason = " ".join(str(getattr(exc, "reason", None) or exc).split())
                raise DatasetError(
                    f"downloading {url} failed ({reason}); put {dest.name} in {dest.parent} "
                    "or pass --data-dir"
                ) from exc
        if expected_md5 is not None and md5.hexdigest() != expected_md5:
            raise checksum_error(f"{dest} (downloaded from {url})", md5.hexdigest(), expected_md5)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return md5.hexdigest()


# What CIFAR needs, with room to spare: the largest member is CIFAR-100's ``train`` (50 000 rows of 3072 bytes
# plus labels and names, ~158 MB), the whole of either archive ~185 MB in about ten members.
MAX_MEMBER_BYTES = 256 << 20
MAX_TOTAL_BYTES = 512 << 20
MAX_MEMBERS = 64
RECORD = ".cliplens-extracted.json"  # inside an extracted folder: which archive it came from


def _check_member(member: tarfile.TarInfo, folder: str, archive: Path) -> None:
    """Admit only plain files and directories inside ``folder/``: no links, no escapes, no giant members."""
    name = posixpath.normpath(member.name)
    parts = name.split("/")
    if name.startswith("/") or ".." in parts or parts[0] != folder:
        raise DatasetError(
            f"{archive}: refusing member {member.name!r}, which is outside {folder}/ "
            "(a tampered archive, or not the one for this data set)"
        )
    if not (member.isfile() or member.isdir()):
        raise DatasetError(f"{archive}: refusing member {member.name!r} (not a regular file)")
    if member.size > MAX_MEMBER_BYTES:
        raise DatasetError(f"{archive}: refusing member {member.name!r} of {member.size / 2**20:.0f} MiB, "
                           f"over the {MAX_MEMBER_BYTES >> 20} MiB that any CIFAR file needs")


def check_archive(archive: Path, folder: str) -> list[str]:
    """Read the whole archive once, before anything is written: every member header is vetted (names, types,
    sizes, count, total) and a gzip stream is decompressed to its end, so its CRC and length trailer are
    checked (tarfile alone stops at the end-of-archive blocks and never looks at them). Returns member names."""
    names, total = [], 0
    with archive.open("rb") as raw:
        gz = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw
        with tarfile.open(fileobj=stream, mode="r|") as tar:  # a stream: headers, data skipped as read
            for member in tar:
                _check_member(member, folder, archive)
                names.append(member.name)
                total += member.size
                if len(names) > MAX_MEMBERS or total > MAX_TOTAL_BYTES:
                    raise DatasetError(f"{archive}: would expand past {MAX_TOTAL_BYTES >> 20} MiB or "
                                       f"{MAX_MEMBERS} members, far more than CIFAR needs; refusing it")
        while stream.read(_CHUNK):  # the rest of the stream: gzip checks its CRC and size at the very end
            pass
    return names


def read_record(folder: Path) -> dict | None:
    """What ``folder`` was extracted from (``extract``'s record), or None when cliplens did not extract it."""
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def extract(archive: Path, folder: str, dest_parent: Path, *, digests: dict | None = None,
            replace: bool = False) -> Path:
    """Extract ``folder/`` from a tar archive into ``dest_parent``; returns the new folder.

    The archive is checked whole first (:func:`check_archive`); the folder is built under a temporary name,
    given a record of the archive's digests, and renamed into place only when complete. ``replace``: an
    existing ``folder/`` that cliplens extracted from another archive is swapped for the new one.
    """
    target = dest_parent / folder
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder}.", suffix=".extracting", dir=dest_parent))
    except OSError as exc:
        raise DatasetError(f"cannot extract {archive} into {dest_parent}: {exc}") from exc
    log.info("extracting %s into %s", archive, dest_parent)
    try:
        check_archive(archive, folder)
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:  # the same bytes were vetted above; checked again, as cheap as it is
                _check_member(member, folder, archive)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, members=members, filter="data")
            else:  # Python < 3.10.12 has no filters; _check_member already vetted every name
                tar.extractall(tmp, members=members)
        if not (tmp / folder).is_dir():
            raise DatasetError(f"{archive}: no {folder}/ folder inside; is it the right archive?")
        digests = digests or file_digests(archive)
        (tmp / folder / RECORD).write_text(json.dumps(
            {"archive": archive.name, "md5": digests["md5"], "sha256": digests["sha256"], "size": digests["size"]}))
        if replace and target.is_dir() and read_record(target) is not None:  # ours: move the old one aside
            os.rename(target, tmp / "previous")
        try:
            os.rename(tmp / folder, target)
        except OSError:
            if not target.is_dir():  # another process finishing first is fine; anything else not
                if (tmp / "previous").is_dir():  # put the old extraction back before tmp is removed
                    os.rename(tmp / "previous", target)
                raise
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DatasetError(
            f"{archive} is truncated or corrupt ({type(exc).__name__}: {exc}); re-download it"
        ) from exc
    except OSError as exc:
        # a full disk or a read-only folder: not damage, so not "re-download"
        raise DatasetError(f"cannot extract {archive} into {dest_parent}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
