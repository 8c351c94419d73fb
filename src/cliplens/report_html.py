"""Pictures and HTML for the evaluation report: matplotlib plots as PNG bytes, one self-contained page.

Plots use matplotlib's object API (``Figure`` + the Agg canvas), never pyplot, so no global backend is chosen
and nothing opens a window. The page has no scripts and no external resources: every image is a
``data:image/png;base64`` URI, so the file can be mailed or opened offline.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from typing import Sequence

import numpy as np

MEASURED, PUBLISHED = "#1f6fb2", "#9a9a9a"


# ---------------------------------------------------------------------------- the document model
@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Figure:
    key: str  # file stem: figures/<key>.png
    caption: str
    png: bytes


@dataclass(frozen=True)
class Section:
    title: str
    blocks: tuple  # str paragraphs, Table, Figure
    level: int = 2


# ---------------------------------------------------------------------------- plots
def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _new(width: float, height: float):
    from matplotlib.figure import Figure as MplFigure

    return MplFigure(figsize=(width, height))


def plot_per_class_ap(ap: np.ndarray, names: Sequence[str], fine_to_coarse: np.ndarray | None,
                      superclass_names: Sequence[str], title: str) -> bytes:
    """Bars of each class's AP, best first, coloured by superclass."""
    ok = np.flatnonzero(~np.isnan(ap))
    order = ok[np.argsort(-ap[ok], kind="stable")]
    fig = _new(max(8.0, 0.2 * len(order) + 2), 5.2)
    ax = fig.add_subplot()
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    if fine_to_coarse is not None and len(superclass_names):
        colours = [cmap(int(fine_to_coarse[i]) % 20) for i in order]
        from matplotlib.patches import Patch

        used = sorted({int(fine_to_coarse[i]) for i in order})
        ax.legend(handles=[Patch(color=cmap(s % 20), label=superclass_names[s].replace("_", " ")) for s in used],
                  fontsize=8, ncol=2, loc="upper right", frameon=False)
    else:
        colours = MEASURED
    ax.bar(np.arange(len(order)), ap[order], color=colours, width=0.85)
    ax.set_xticks(np.arange(len(order)), [names[i].replace("_", " ") for i in order], rotation=90, fontsize=8)
    ax.set_xlim(-0.6, len(order) - 0.4)
    ax.set_ylim(0, 1)
    ax.set_ylabel("average precision", fontsize=10)
    ax.set_xlabel("class (best first)", fontsize=10)
    ax.set_title(title, fontsize=11)
    return _png(fig)


def plot_confusion(cm: np.ndarray, names: Sequence[str], title: str) -> bytes:
    """Row-normalised heatmap (share of each true class predicted as each class), counts written in the cells."""
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    n = len(names)
    fig = _new(0.42 * n + 3, 0.42 * n + 2)
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    labels = [s.replace("_", " ") for s in names]
    ax.set_xticks(np.arange(n), labels, rotation=90, fontsize=9)
    ax.set_yticks(np.arange(n), labels, fontsize=9)
    ax.set_xlabel("predicted superclass", fontsize=10)
    ax.set_ylabel("true superclass", fontsize=10)
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=5,
                        color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.04, label="share of the true superclass's images")
    ax.set_title(title, fontsize=10)
    return _png(fig)


def plot_template_comparison(rows: Sequence[dict], published: Sequence[dict], title: str) -> bytes:
    """Zero-shot top-1 of each variant measured here (blue) beside the published anchors (grey, labelled)."""
    labels = [f"{r['templates']} ({r['num_templates']})\n{r['classnames']}, {r['ensemble']}" for r in rows]
    values = [r["top1"] for r in rows]
    pub = [p for p in published if p["metric"] == "zero-shot top-1"]
    labels += [f"published\n{p['source']}" for p in pub]
    values += [p["value"] for p in pub]
    colours = [MEASURED] * len(rows) + [PUBLISHED] * len(pub)
    fig = _new(max(7.0, 1.05 * len(labels) + 1.5), 4.4)
    ax = fig.add_subplot()
    bars = ax.bar(np.arange(len(labels)), values, color=colours, hatch=None)
    for b in bars[len(rows):]:
        b.set_hatch("//")
    for x, v in enumerate(values):
        ax.text(x, v + 0.01, f"{100 * v:.1f}%", ha="center", fontsize=8)
    ax.set_xticks(np.arange(len(labels)), labels, rotation=35, ha="right", fontsize=9)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("zero-shot top-1", fontsize=10)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=MEASURED, label="measured here"),
                       Patch(facecolor=PUBLISHED, hatch="//", label="published (ViT-B/32 openai, not measured)")],
              fontsize=8, loc="upper left", frameon=False)
    ax.set_title(title, fontsize=10)
    return _png(fig)


def grid_png(images, captions, matches, title: str) -> bytes:
    from cliplens.grid import render_grid

    buf = io.BytesIO()
    render_grid(images, captions, matches, title=title, cell=96, columns=8).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------- HTML
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d232a;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px 28px 64px;background:#fff}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:34px 0 8px;border-bottom:1px solid #dde1e6;padding-bottom:4px}
h3{font-size:16px;margin:22px 0 6px}p{margin:6px 0}
table{border-collapse:collapse;margin:8px 0 14px;font-size:13px}
th,td{border:1px solid #dde1e6;padding:3px 8px;text-align:left;vertical-align:top}th{background:#eef1f4}
td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:10px 0 18px}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:12px;color:#56606b}.pub{color:#6b6b6b;font-style:italic}
nav a{margin-right:12px;display:inline-block}.scroll{overflow-x:auto;max-width:100%}
p,figcaption,h1,h2,h3{overflow-wrap:anywhere}.warn{background:#fff3cd;border:1px solid #e0b000;padding:8px 12px}
@media (max-width:700px){main{padding:12px 10px 40px}body{font-size:15px}table{font-size:12px}
th,td{padding:2px 5px}h1{font-size:20px}h2{font-size:17px}}
"""


def _cell(text: str) -> str:
    t = html.escape(text)
    num = text.replace("%", "").replace(".", "", 1).replace("-", "", 1).strip().isdigit()
    cls = ' class="num"' if num else (' class="pub"' if text.startswith("published") else "")
    return f"<td{cls}>{t}</td>"


def render_html(title: str, sections: Sequence[Section]) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body><main>",
             f"<h1>{html.escape(title)}</h1>"]
    anchors = [(f"s{i}", s.title) for i, s in enumerate(sections) if s.level == 2]
    parts.append("<nav>" + "".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t in anchors) + "</nav>")
    for i, s in enumerate(sections):
        parts.append(f'<h{s.level} id="s{i}">{html.escape(s.title)}</h{s.level}>')
        for b in s.blocks:
            if isinstance(b, str):
                cls = ' class="warn"' if b.startswith("Warning:") else ""
                parts.append(f"<p{cls}>{html.escape(b)}</p>")
            elif isinstance(b, Table):
                head = "".join(f"<th>{html.escape(h)}</th>" for h in b.headers)
                body = "".join("<tr>" + "".join(_cell(c) for c in r) + "</tr>" for r in b.rows)
                parts.append(f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>')
            elif isinstance(b, Figure):
                data = base64.b64encode(b.png).decode("ascii")
                parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(b.caption)}">'
                             f"<figcaption>{html.escape(b.caption)}</figcaption></figure>")
    parts.append("</main></body></html>\n")
    return "\n".join(parts)
