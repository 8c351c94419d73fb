"""Result grids: the top-k images enlarged, a caption under each, green/red borders for right/wrong class."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from cliplens._files import atomic_path
from cliplens.errors import StoreError

GREEN, RED, GREY = (34, 160, 60), (210, 40, 40), (150, 150, 150)


def render_grid(images: Sequence[np.ndarray], captions: Sequence[str], matches: Sequence[bool | None], *,
                title: str | None = None, cell: int = 128, columns: int | None = None):
    """Return a PIL image: one cell per result, ``cell`` px square, border colour from ``matches``."""
    from PIL import Image, ImageDraw, ImageFont

    n = len(images)
    columns = columns or min(n, 5) or 1
    rows = max(1, math.ceil(n / columns))
    border, caption_h, pad = 4, 30, 6
    title_h = 24 if title else 0
    w = columns * (cell + 2 * border + pad) + pad
    h = title_h + rows * (cell + 2 * border + caption_h + pad) + pad
    canvas = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    if title:
        draw.text((pad, 6), title, fill="black", font=font)
    for i, (img, caption, match) in enumerate(zip(images, captions, matches)):
        r, c = divmod(i, columns)
        x = pad + c * (cell + 2 * border + pad)
        y = title_h + pad + r * (cell + 2 * border + caption_h + pad)
        colour = GREY if match is None else (GREEN if match else RED)
        draw.rectangle([x, y, x + cell + 2 * border - 1, y + cell + 2 * border - 1], fill=colour)
        tile = (img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))).convert("RGB")
        if max(tile.size) > cell:
            tile.thumbnail((cell, cell), Image.Resampling.LANCZOS)
        elif max(tile.size) < cell:  # tiny images (CIFAR 32 px): enlarge with visible pixels, as a person expects
            scale = cell / max(tile.size)
            tile = tile.resize((round(tile.width * scale), round(tile.height * scale)), Image.Resampling.NEAREST)
        canvas.paste(tile, (x + border + (cell - tile.width) // 2, y + border + (cell - tile.height) // 2))
        for j, line in enumerate(caption.split("\n")[:2]):
            draw.text((x, y + cell + 2 * border + 2 + 13 * j), line[:24], fill="black", font=font)
    return canvas


def save_grid(path: str | Path, images, captions, matches, **kwargs) -> Path:
    path = Path(path)
    if path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise ValueError(f"grid file must end in .png, .jpg or .webp, got {path.name}")
    img = render_grid(images, captions, matches, **kwargs)
    with atomic_path(path) as tmp:
        img.save(tmp, format={".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG"))
    return path


def store_tiles(store, ids) -> list:
    """Images to draw for ``ids``: CIFAR tiles, or the photos' stored 256 px thumbnails (aspect kept)."""
    import io

    from PIL import Image

    images = store.images()
    if images is not None:
        return [images[i] for i in ids]
    if not store.has_thumbnails:
        raise StoreError(f"{store.root} stores no thumbnails, so no grid can be drawn: index the folder again "
                            "with this cliplens")
    out = []
    for i in ids:
        data = store.thumbnail(int(i), 256)
        with Image.open(io.BytesIO(data)) as im:
            out.append(np.asarray(im.convert("RGB")))
    return out


class StoreTiles:
    """An index's images by id, for figures: CIFAR tiles, or the photos' stored 256 px thumbnails, decoded on use."""

    def __init__(self, store):
        self.store = store

    def __getitem__(self, item_id: int):
        return store_tiles(self.store, [int(item_id)])[0]

    def __len__(self) -> int:
        return len(self.store)


def figure_images(store):
    """What a report can draw an index's items with (None when the index stores no images)."""
    tiles = store.images()
    if tiles is not None:
        return tiles
    return StoreTiles(store) if getattr(store, "has_thumbnails", False) else None
