"""PTQLogic's layers (docs/architecture.md): imports point down only, no import cycles, no private names
imported across modules. Walks the package's own source with ``ast``: every import counts, also those
inside functions and under ``TYPE_CHECKING``."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "PTQLogic"

# Lowest first. A module may import its own layer and the layers below it. Keep docs/architecture.md in step.
LAYERS = (
    ("core",),
    ("io",),
    ("evaluation",),
    ("models",),
    ("onnx_graph",),
    ("engines",),
    ("inference",),
    ("quantization",),
    ("samples",),
    ("pipeline",),  # PTQLogic/pipeline.py: the two public calls
    ("cohort", "slicer"),
    ("app",),
    ("__main__",),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path) -> str:
    parts = ("PTQLogic",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts}


def _imports(module: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names, line) for every import of a PTQLogic module in ``path``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "PTQLogic":
                continue
            names = [alias.name for alias in node.names]
            submodules = [f"{target}.{name}" for name in names if f"{target}.{name}" in MODULES]
            found += [(sub, [], node.lineno) for sub in submodules]
            if len(submodules) < len(names):
                found.append((target, [n for n in names if f"{target}.{n}" not in MODULES], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names if alias.name.split(".")[0] == "PTQLogic"]
    return found


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "package face"


def test_every_module_belongs_to_a_layer():
    unknown = sorted({_layer(m) for m in MODULES} - set(RANK) - {"package face"})
    assert unknown == [], f"add these to LAYERS (and docs/architecture.md): {unknown}"


def test_imports_point_down():
    upward = []
    for module, imports in GRAPH.items():
        if _layer(module) == "package face":
            continue
        for target, _, line in imports:
            if target == "PTQLogic":  # the package face: __version__ and the telemetry switch
                continue
            if RANK[_layer(target)] > RANK[_layer(module)]:
                upward.append(f"{module}:{line} imports {target}")
    assert upward == []


def test_no_private_names_across_modules():
    private = [f"{module}:{line} imports {name} from {target}"
               for module, imports in GRAPH.items() for target, names, line in imports
               for name in names if name.startswith("_") and not name.startswith("__") and target != module]
    assert private == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    graph = {module: {t for t, _, _ in imports if t != module} for module, imports in GRAPH.items()}
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("name", ["quantize_model", "segment"])
def test_package_root_holds_only_the_face_and_the_public_calls(name):
    root_files = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert root_files == ["__init__.py", "__main__.py", "pipeline.py"]
    import PTQLogic.pipeline as pipeline

    assert callable(getattr(pipeline, name))


def test_segment_names_no_model_source():
    """``segment`` goes through the segmenter interface: no nnU-Net, bundle or spec branches of its own."""
    tree = ast.parse((PACKAGE / "pipeline.py").read_text(encoding="utf-8"))
    for func in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("segment", "quantize_model")):
        words = {node.id for node in ast.walk(func) if isinstance(node, ast.Name)}
        words |= {node.attr for node in ast.walk(func) if isinstance(node, ast.Attribute)}
        words |= {alias.name for node in ast.walk(func) if isinstance(node, ast.ImportFrom) for alias in node.names}
        assert not {w for w in words if any(s in w.lower() for s in ("nnunet", "bundle"))}, func.name


def test_architecture_page_lists_the_layers_in_order():
    import re

    page = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\d+) \| (.+?) \|", page, flags=re.M)
    documented = [tuple(re.findall(r"`([\w.]+?)(?:/|\.py)?`", names)) for _, names in rows]
    assert documented == [names for names in LAYERS if names != ("__main__",)]
