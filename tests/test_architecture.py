"""The floors of the code base: no import runs back up, no circles, mlflow only inside tracking, and the
installed distribution holds one top-level package.

Imports made only for type checkers (``if TYPE_CHECKING:``) do not run and are not arrows: the training
loops take config sections as annotations only, while the config validates names against the training,
method, calibration and selection registries, so the config sits above them.

The import graph is grimp's (the library behind import-linter). ``pipelines/`` installs as
``fewshot_med.pipelines``; grimp reads it as the top-level folder it is in the repository, so imports of
``fewshot_med.pipelines.<module>`` are mapped onto ``pipelines.<module>``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[1]
INSTALLED_AS = "fewshot_med.pipelines"

#: Top floor first; modules on one floor (separated by ``|``) may not import each other.
FLOORS = (
    "benchmarks",
    "fewshot_med.__main__",
    "fewshot_med.cli",
    "pipelines | fewshot_med.reporting",
    "fewshot_med.audit",
    "fewshot_med.tracking",
    "fewshot_med.config",
    "fewshot_med.training | fewshot_med.deploy",
    "fewshot_med.robustness",
    "fewshot_med.evaluation",
    "fewshot_med.methods",
    "fewshot_med.selection | fewshot_med.priors",
    "fewshot_med.models",
    "fewshot_med.privacy",
    "fewshot_med.data",
    "fewshot_med.runtime | fewshot_med._io | fewshot_med.progress",
    "fewshot_med.errors",
)


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    graph = grimp.build_graph(
        "fewshot_med",
        "pipelines",
        "benchmarks",
        include_external_packages=True,
        exclude_type_checking_imports=True,
        cache_dir=None,
    )
    for importer in list(graph.modules):
        for imported in graph.find_modules_directly_imported_by(importer):
            if imported == INSTALLED_AS or imported.startswith(INSTALLED_AS + "."):
                graph.add_import(importer=importer, imported="pipelines" + imported[len(INSTALLED_AS) :])
    return graph


def test_every_module_is_on_a_floor(graph):
    named = {name.strip() for floor in FLOORS for name in floor.split("|")}
    assert named <= set(graph.modules)
    assert graph.find_children("fewshot_med") - named == set()


def test_no_import_runs_back_up(graph):
    layers = [grimp.Layer(*(name.strip() for name in floor.split("|")), independent=True) for floor in FLOORS]
    illegal = graph.find_illegal_dependencies_for_layers(layers=layers)
    arrows = sorted(
        f"{route.heads} -> {route.tails}" for dependency in illegal for route in dependency.routes
    )
    assert arrows == []


@pytest.mark.parametrize("package", ["fewshot_med", "pipelines", "benchmarks"])
def test_no_circles(graph, package):
    packages = [package, *(m for m in graph.find_descendants(package) if graph.find_children(m))]
    circles = {name: graph.nominate_cycle_breakers(name) for name in packages}
    assert {name: breakers for name, breakers in circles.items() if breakers} == {}


def test_mlflow_is_imported_only_inside_tracking(graph):
    importers = graph.find_modules_that_directly_import("mlflow")
    assert importers, "the graph lost the tracking package's mlflow imports"
    assert sorted(m for m in importers if not m.startswith("fewshot_med.tracking")) == []


def test_pyproject_names_every_package_folder():
    tomllib = pytest.importorskip("tomllib")
    settings = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    folders = {
        ".".join(path.parent.relative_to(REPO).parts) for path in (REPO / "fewshot_med").rglob("__init__.py")
    }
    assert set(settings["packages"]) == folders | {INSTALLED_AS}
    assert settings["package-dir"] == {INSTALLED_AS: "pipelines"}


@pytest.mark.slow
def test_the_wheel_installs_one_top_level_package(tmp_path):
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    for folder in ("fewshot_med", "pipelines"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", "dist"]
    command.append(".")
    subprocess.run(command, cwd=source, check=True, capture_output=True)
    (wheel,) = (source / "dist").glob("fewshot_med-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"fewshot_med"}
    assert "fewshot_med/pipelines/transfer.py" in names
