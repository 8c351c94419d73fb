"""The helper process of a model's first exact indexing run (:func:`cliplens.imageonly.prepare`).

``python -m cliplens.imageonly_build REQUEST`` (REQUEST: JSON with the folder to write in and the model flags)
loads the model with torch and open_clip, writes its image tower as an ONNX graph into the folder
(:func:`cliplens.imageonly.write_entry`), with open_clip's own embeddings of probe images for the parent to check
the graph against, and exits: the parent indexes with ONNX Runtime and never holds torch (0.5 GB resident for its
import alone) beside the session. Whatever happens is written to ``result.json`` in the folder:

    {"status": "built", "meta": {...}}          the entry, and probe.npz (pixels, reference)
    {"status": "declined", "message": ...}      a tower that cannot be cached: indexing keeps torch
    {"status": "error", "message": ..., "fix"}  the model cannot be loaded (the parent says so, as loading would)
    {"status": "failed", "message": ...}        anything else
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    request = json.loads(argv[0])
    folder = Path(request["folder"])
    logging.basicConfig(level=int(request.get("log_level", logging.WARNING)),
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        result = _build(request, folder)
    except KeyboardInterrupt:
        return 130
    except MemoryError:
        result = {"status": "failed", "message": "out of memory loading the model"}
    from cliplens._files import write_bytes_atomic

    write_bytes_atomic(folder / "result.json", json.dumps(result).encode())
    return 0


def _build(request: dict, folder: Path) -> dict:
    from cliplens import imageonly
    from cliplens.errors import CliplensError

    try:
        from cliplens.encoder import load_encoder

        encoder = load_encoder(request["name"], request.get("pretrained"), weights=request.get("weights"),
                               device="cpu", precision="exact")
    except CliplensError as exc:
        return {"status": "error", "message": str(exc), "fix": exc.fix}
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which loads the model itself and says why
        return {"status": "failed", "message": _line(exc)}
    from cliplens.vit_onnx import open_clip_tower

    try:
        meta, pixels, want = imageonly.write_entry(encoder, folder, reference=open_clip_tower(encoder))
    except imageonly.Declined as exc:
        return {"status": "declined", "message": str(exc)}
    except Exception as exc:  # noqa: BLE001 - an export failure (a full disk): the parent keeps torch
        return {"status": "failed", "message": _line(exc)}
    import numpy as np

    with open(folder / "probe.npz", "wb") as f:
        np.savez(f, pixels=pixels, reference=want)
    return {"status": "built", "meta": meta}


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
