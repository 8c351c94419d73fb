"""The shape the code promises (docs/architecture.md), checked on the source itself so it stays true."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "cliplens"
ENCODER_PACKAGE = {"encoder.py", "fast.py", "packed.py", "vit_onnx.py", "vit_torch.py",  # the only modules importing torch
                   "gpu_preprocess.py",  # the encoder's preprocessing on its device: torch tensors, used by encoder.py only
                   "gpu_tower.py"}  # the image tower readied for CUDA (fp16 weights), used by encoder.py only


def modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports (at any depth: lazy imports inside functions count too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_torch_and_open_clip_are_imported_only_by_the_encoder_package():
    offenders = [f"{p.relative_to(SRC)}: {m}" for p in modules() if p.name not in ENCODER_PACKAGE or p.parent != SRC
                 for m in sorted(imported(p)) if m.split(".")[0] in ("torch", "open_clip", "torchvision")]
    assert offenders == []


def test_only_the_manifest_module_parses_manifests():
    """Readers use the typed Manifest (cliplens.manifest); only the index-folder modules name the file."""
    allowed = {"manifest.py", "writer.py", "layout.py", "store.py"}
    offenders = [str(p.relative_to(SRC)) for p in modules()
                 if p.name not in allowed and re.search(r"""["']manifest\.json["']|\bMANIFEST\b""", p.read_text())]
    assert offenders == []


def _cli_graph() -> dict[str, set[str]]:
    cli = SRC / "cli"
    names = {p.stem for p in cli.glob("*.py")}
    graph = {}
    for p in cli.glob("*.py"):
        deps = set()
        for m in imported(p):
            parts = m.split(".")
            if parts[:2] == ["cliplens", "cli"] and len(parts) > 2 and parts[2] in names and parts[2] != p.stem:
                deps.add(parts[2])
        graph[p.stem] = deps
    return graph


def test_the_cli_modules_import_each_other_without_a_cycle():
    graph = _cli_graph()
    seen, stack = set(), []

    def visit(node):
        if node in stack:
            pytest.fail(f"import cycle: {' -> '.join(stack[stack.index(node):] + [node])}")
        if node in seen:
            return
        stack.append(node)
        for dep in sorted(graph[node]):
            visit(dep)
        stack.pop()
        seen.add(node)

    for node in sorted(graph):
        visit(node)
    assert "core" not in {d for n, deps in graph.items() if n != "__init__" for d in deps}  # shared code: common


def test_the_cli_asks_the_backend_registry_instead_of_switching_on_names():
    from cliplens.index.registry import BACKENDS

    pattern = re.compile(r"""==\s*["'](%s)["']""" % "|".join(BACKENDS))
    offenders = [f"{p.name}:{i}" for p in (SRC / "cli").glob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_the_fast_module_never_rewires_an_encoder():
    """The exact and fast towers are composed when the encoder is made (load_encoder), not swapped later."""
    text = (SRC / "fast.py").read_text()
    assert not re.search(r"\bencoder\.(model\.visual|info|text_runner)\s*=", text)
