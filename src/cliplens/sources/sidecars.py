"""Caption sidecars beside images: ``photo.txt`` / ``photo.json`` (or ``photo.jpg.txt`` / ``photo.jpg.json``)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from cliplens._safe import MAX_JSON_DEPTH, has_control, json_depth
from cliplens.sources._fs import display_name, open_regular

log = logging.getLogger(__name__)

SIDECAR_MAX_BYTES = 1 << 20  # a caption file larger than 1 MiB is not a caption


def sidecar_names(name: str) -> tuple[str, ...]:
    """The file names a sidecar of image ``name`` may have, in the order they are tried: ``photo.txt``,
    ``photo.jpg.txt``, ``photo.json``, ``photo.jpg.json``."""
    stem = name.rsplit(".", 1)[0] if "." in name[1:] else name
    return tuple(n for suffix in (".txt", ".json") for n in (stem + suffix, name + suffix))


def read_sidecar(image_path: str | Path, *, root: str | Path | None = None) -> tuple[str | None, str | None]:
    """(caption, metadata JSON text) from ``photo.txt``/``photo.json`` or ``photo.jpg.txt``/``photo.jpg.json``.

    A ``.txt`` sidecar is the caption. A ``.json`` sidecar is kept whole as metadata, and its "caption"
    (or "title" or "description") string becomes the caption when there is no ``.txt``. Sidecars follow the
    images' rules: a symbolic link is read only when it resolves inside ``root`` (never, without a root), a
    FIFO or device is never opened, and a file over SIDECAR_MAX_BYTES, not UTF-8, holding control characters
    (binary content), or JSON nested deeper than MAX_JSON_DEPTH is ignored with a warning: a caption is never
    worth failing an image for, and never shows the contents of a file outside the folder.
    """
    p = Path(image_path)
    caption = meta = None
    names = sidecar_names(p.name)
    for suffix, pair in ((".txt", names[:2]), (".json", names[2:])):
        for cand in (p.with_name(n) for n in pair):
            if not os.path.lexists(cand):
                continue
            text = _read_sidecar_text(cand, root)
            if text is None:
                break  # present but refused: the other spelling does not stand in for it
            if suffix == ".txt":
                caption = caption or text or None
            else:
                meta, from_json = _sidecar_json(cand, text)
                if caption is None:
                    caption = from_json
            break  # the first existing sidecar of each kind wins
    return caption, meta


def _read_sidecar_text(cand: Path, root: str | Path | None) -> str | None:
    name = display_name(cand.name)
    if cand.is_symlink() and root is None:
        log.warning("sidecar %s is a symbolic link; ignored", name)
        return None
    try:
        with open_regular(cand, root=root, max_bytes=SIDECAR_MAX_BYTES) as f:
            if os.fstat(f.fileno()).st_nlink > 1:  # a hard link: its other name may be any file, outside too
                log.warning("sidecar %s has other hard links (the same file may live outside the folder); ignored",
                            name)
                return None
            data = f.read(SIDECAR_MAX_BYTES + 1)
        text = data.decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        log.warning("cannot use sidecar %s (%s); ignored", name, why)
        return None
    if len(data) > SIDECAR_MAX_BYTES or has_control(text):
        log.warning("sidecar %s is %s; ignored", name, "too large" if len(data) > SIDECAR_MAX_BYTES else "not text")
        return None
    return text


def _sidecar_json(cand: Path, text: str) -> tuple[str | None, str | None]:
    """(metadata JSON text, caption from it) of a .json sidecar's text; (None, None) when it is not usable."""
    name = display_name(cand.name)
    if json_depth(text) > MAX_JSON_DEPTH:
        log.warning("sidecar %s nests deeper than %d levels; ignored", name, MAX_JSON_DEPTH)
        return None, None
    try:
        obj = json.loads(text)
    except ValueError:
        log.warning("sidecar %s is not valid JSON; ignored", name)
        return None, None
    meta = json.dumps(obj, sort_keys=True, ensure_ascii=False)
    if isinstance(obj, dict):
        for key in ("caption", "title", "description"):
            value = obj.get(key)
            if isinstance(value, str) and value.strip() and not has_control(value):
                return meta, value.strip()
    return meta, None
