"""The package's import arrows: the product never imports the lab (bench, studies), data never imports the
model, deployment (inference, export, fuse) never imports the training engine, and nothing below the
command line imports it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ssd"
LAB = ("ssd.bench", "ssd.studies")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(at_import: bool = False) -> dict[str, set[str]]:
    """Every ``ssd`` module -> the ``ssd`` modules it imports, inside functions too; with ``at_import`` only
    those that run when the module is imported (not inside a function)."""
    found: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        names: set[str] = set()
        todo = list(ast.parse(path.read_text()).body)
        while todo:
            node = todo.pop()
            if at_import and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ssd"):
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names if alias.name.startswith("ssd"))
            todo.extend(ast.iter_child_nodes(node))
        found[module_name(path)] = names
    return found


def inside(name: str, roots: tuple[str, ...]) -> bool:
    return any(name == root or name.startswith(root + ".") for root in roots)


def offenders(
    sources: tuple[str, ...], targets: tuple[str, ...], exempt: tuple[str, ...] = (), allowed: tuple[str, ...] = ()
) -> list[str]:
    """``module imports name`` for every import from ``sources`` (but ``exempt``) into ``targets`` (but ``allowed``)."""
    return sorted(
        f"{module} imports {name}"
        for module, names in imports().items()
        if inside(module, sources) and not inside(module, exempt)
        for name in names
        if inside(name, targets) and not inside(name, allowed)
    )


def test_the_product_never_imports_the_lab():
    # ssd bench is the one command that runs the lab; the lab itself imports the product freely
    assert offenders(("ssd",), LAB, exempt=(*LAB, "ssd.commands.bench")) == []


def reachable(start: str, graph: dict[str, set[str]]) -> set[str]:
    """The ``ssd`` modules ``start`` imports, directly or through others (a module's parents run first too)."""
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for known in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):
            if known in graph and known not in seen:
                seen.add(known)
                todo.extend(graph[known])
    return seen


def test_the_data_package_reaches_no_model_through_any_path():
    # the dataset check, the loader and the shapes generator run without the network's code in the process
    graph = imports(at_import=True)
    network = ("ssd.model", "ssd.priorfit", "ssd.engine")
    for module in ("ssd.data.check", "ssd.data.dataset", "ssd.data.loader", "ssd.data.shapes"):
        assert sorted(m for m in reachable(module, graph) if inside(m, network)) == [], module


def test_arrows_point_down():
    # data never builds the network: matching happens in the loss, on the device
    assert (
        offenders(("ssd.data",), ("ssd.model", "ssd.engine", "ssd.loss", "ssd.priorfit", "ssd.commands", "ssd.cli"))
        == []
    )
    deployment = ("ssd.inference", "ssd.export", "ssd.fuse", "ssd.preprocess", "ssd.postprocess")
    assert offenders(deployment, ("ssd.engine", "ssd.commands", "ssd.cli")) == []
    assert offenders(("ssd",), ("ssd.commands", "ssd.cli"), exempt=("ssd.commands", "ssd.cli", "ssd.__main__")) == []
    assert offenders(("ssd.config",), ("ssd",), allowed=("ssd.config",)) == []  # the ground
