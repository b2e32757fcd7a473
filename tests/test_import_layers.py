"""The package's imports run one way (read with `ast`, so lazy imports inside functions count too).

    codecs, data, config -> model -> sampling -> training, evaluation, serving -> CLI
    data, base_models, utils -> vlm -> CLI
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lmfusion"

FORBIDDEN = {  # area -> areas it must not import
    "model": {"sampling", "training", "evaluation", "serving", "cli", "vlm"},
    "sampling": {"training", "evaluation", "serving", "cli", "vlm"},
    "evaluation": {"training", "serving", "cli"},
    "codecs": {"model", "sampling", "training", "evaluation", "serving", "cli"},
    "data": {"model", "sampling", "training", "evaluation", "serving", "cli", "vlm"},
    # The tiny VLM is plain transformers plus shapes data: LMFusion wraps it, never the reverse.
    "vlm": {"model", "sampling", "training", "evaluation", "serving", "cli"},
}
# Known exceptions still to move (each names why it is here).
ALLOWED: set[tuple[str, str]] = set()


def _area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "lmfusion" else ""


def _imports(path: Path) -> set[str]:
    """Absolute lmfusion.* modules imported anywhere in the file."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {m for m in found if m.startswith("lmfusion")}


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).as_posix()
        graph[rel] = {_area(m) for m in _imports(path)} - {""}
    return graph


def test_areas_import_only_downwards():
    wrong = []
    for path, areas in _graph().items():
        area = _area(".".join(Path(path).with_suffix("").parts))
        for target in sorted(areas & FORBIDDEN.get(area, set())):
            if (path, target) not in ALLOWED:
                wrong.append(f"{path} imports lmfusion.{target}")
    assert not wrong, "\n".join(wrong)


def test_no_cycle_between_areas():
    edges: dict[str, set[str]] = {}
    for path, areas in _graph().items():
        area = _area(".".join(Path(path).with_suffix("").parts))
        if (path, "training") in ALLOWED:
            areas = areas - {"training"}
        edges.setdefault(area, set()).update(a for a in areas if a != area)

    def visit(node, trail):
        for nxt in sorted(edges.get(node, ())):
            assert nxt not in trail, f"import cycle: {' -> '.join(trail + [nxt])}"
            visit(nxt, trail + [nxt])

    for start in sorted(edges):
        visit(start, [start])


def test_the_parser_sees_relative_and_lazy_imports():
    imports = _imports(PACKAGE / "sampling" / "pipeline.py")  # `from ..run_folders import` inside a function
    assert "lmfusion.run_folders" in imports and "lmfusion.model.lmfusion" in imports
