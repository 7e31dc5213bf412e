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


def imports() -> dict[str, set[str]]:
    """Every ``ssd`` module -> the ``ssd`` modules it imports (at the top or inside functions)."""
    found: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ssd"):
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names if alias.name.startswith("ssd"))
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


def test_arrows_point_down():
    # data never builds the network: matching happens in the loss, on the device
    assert offenders(("ssd.data",), ("ssd.model", "ssd.engine", "ssd.loss", "ssd.commands", "ssd.cli")) == []
    deployment = ("ssd.inference", "ssd.export", "ssd.fuse", "ssd.preprocess", "ssd.postprocess")
    assert offenders(deployment, ("ssd.engine", "ssd.commands", "ssd.cli")) == []
    assert offenders(("ssd",), ("ssd.commands", "ssd.cli"), exempt=("ssd.commands", "ssd.cli", "ssd.__main__")) == []
    assert offenders(("ssd.config",), ("ssd",), allowed=("ssd.config",)) == []  # the ground
