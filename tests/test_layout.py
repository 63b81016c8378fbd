"""The layout: the program's modules import one another without a cycle, and an install
adds only names of the project's own to site-packages."""

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL = ("memlease_server", "memlease_client", "buddy", "protocol")


def program_modules() -> Dict[str, Path]:
    """Every module of the program, by its import name."""
    modules = {name: ROOT / (name + ".py") for name in TOP_LEVEL}
    for path in sorted((ROOT / "memlease").glob("*.py")):
        name = "memlease" if path.stem == "__init__" else "memlease." + path.stem
        modules[name] = path
    return modules


def _is_main_guard(node: ast.stmt) -> bool:
    """``if __name__ == "__main__":``, where a script hands over to another module."""
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
    )


def imports_of(path: Path, known: Set[str]) -> Set[str]:
    """The program's modules that ``path`` imports anywhere but under a main guard."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: Set[str] = set()
    pending: List[ast.AST] = [node for node in tree.body if not _is_main_guard(node)]
    while pending:
        node = pending.pop()
        pending.extend(ast.iter_child_nodes(node))
        names: List[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [node.module + "." + alias.name for alias in node.names]
        found.update(name for name in names if name in known)
    return found


def test_the_programs_modules_import_one_another_without_a_cycle() -> None:
    modules = program_modules()
    graph = {name: imports_of(path, set(modules)) - {name} for name, path in modules.items()}
    assert graph["memlease.cli"] >= {"memlease_client", "memlease.cluster"}

    def cycle_from(start: str, path: List[str]) -> List[str]:
        for nxt in sorted(graph[path[-1]]):
            if nxt == start:
                return path + [nxt]
            if nxt not in path:
                found = cycle_from(start, path + [nxt])
                if found:
                    return found
        return []

    cycles = [cycle_from(name, [name]) for name in sorted(graph)]
    assert [cycle for cycle in cycles if cycle] == []


def test_an_install_adds_only_the_projects_own_names(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")  # requirements-dev.txt installs it
    source = tmp_path / "source"  # a copy, so that the build leaves the checkout as it was
    shutil.copytree(
        str(ROOT / "memlease"),
        str(source / "memlease"),
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    for name in [*TOP_LEVEL, "pyproject", "README"]:
        for path in ROOT.glob(name + ".*"):
            shutil.copy(str(path), str(source / path.name))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True,
        timeout=240,
        cwd=str(tmp_path),
    )  # fmt: skip
    assert built.returncode == 0, built.stderr.decode(errors="replace")
    (wheel,) = tmp_path.glob("memlease-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    tops = {name.split("/", 1)[0] for name in names}
    dist_info = {top for top in tops if top.endswith(".dist-info")}
    assert len(dist_info) == 1
    assert tops - dist_info == {name + ".py" for name in TOP_LEVEL} | {"memlease"}
    packaged = {name[len("memlease/") :] for name in names if name.startswith("memlease/")}
    assert packaged == {path.name for path in (ROOT / "memlease").glob("*.py")}
    assert "memlease-server = memlease_server:main" in scripts
    assert "memlease-client = memlease.cli:main" in scripts
