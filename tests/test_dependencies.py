"""pyproject.toml's requirements: met by what is installed, complete for what ssd/ imports, and the
same floors docs/dependencies.md gives reasons for."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import warnings
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirements(specs: list[str]) -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in map(Requirement, specs)}


def test_the_installed_packages_meet_the_runtime_requirements(project):
    for name, req in requirements(project["dependencies"]).items():
        installed = importlib.metadata.version(name)
        assert req.specifier.contains(installed, prereleases=True), f"{name} {installed} does not satisfy {req}"


def test_albumentations_is_bounded_below_its_next_major_version(project):
    spec = requirements(project["dependencies"])["albumentations"].specifier
    assert spec.contains("2.0.8") and not spec.contains("3.0.0") and not spec.contains("2.0.1")


def test_every_third_party_module_ssd_imports_is_declared(project):
    declared = set(requirements(project["dependencies"]))
    for extra in project["optional-dependencies"].values():
        declared |= set(requirements(extra))
    modules = set()
    for path in (ROOT / "ssd").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    third_party = sorted(modules - set(sys.stdlib_module_names) - {"ssd", "__future__"})
    assert {"torch", "cv2", "albumentations", "pycocotools", "yaml"} <= set(third_party)  # the walk found the imports
    distributions = importlib.metadata.packages_distributions()
    undeclared = {
        m: distributions.get(m)
        for m in third_party
        if not {canonicalize_name(d) for d in distributions.get(m, [])} & declared
    }
    assert not undeclared, f"imported by ssd/ but not in pyproject.toml: {undeclared}"


def test_the_docs_table_gives_the_floors_of_pyproject(project):
    table = {}
    for line in (ROOT / "docs" / "dependencies.md").read_text().split("## torch")[0].splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 3 and re.match(r"\d", cells[1]):
            table[canonicalize_name(cells[0].split(" (")[0])] = cells[1].split(",")[0]
    for name, req in requirements(project["dependencies"]).items():
        floors = [s.version for s in req.specifier if s.operator == ">="]
        assert table.get(name) == floors[0], (
            f"{name}: pyproject says >={floors[0]}, docs/dependencies.md {table.get(name)}"
        )


def test_the_license_is_an_spdx_expression_setuptools_reads_without_warnings():
    """PEP 639's ``license = "MIT"``: the TOML-table form (``{text = "MIT"}``) printed a setuptools
    deprecation warning on every install; the build floor is the first setuptools that reads it (77)."""
    setuptools = pytest.importorskip("setuptools")
    if Version(setuptools.__version__) < Version("77"):
        pytest.skip(f"setuptools {setuptools.__version__} predates PEP 639 (the build requires >= 77)")
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), str(ROOT / "pyproject.toml"))  # reads, builds nothing
    assert [str(w.message).splitlines()[0] for w in caught] == []
    assert dist.metadata.license_expression == "MIT" and [Path(f).name for f in dist.metadata.license_files] == [
        "LICENSE"
    ]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n")
    (build,) = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert Requirement(build).name == "setuptools" and Requirement(build).specifier == SpecifierSet(">=77")
