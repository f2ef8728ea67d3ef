"""The package layout's one rule (README, "Layout"): every package and top-level module of ``src/awqkit`` imports
only from the levels below its own, at module level or inside functions (imports under ``if TYPE_CHECKING:`` are
annotations only and do not count). So there is no import cycle between packages, and a change in one room
cannot break the rooms beneath it."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "awqkit"

# bottom to top; a unit may import its own level and those before it
LEVELS: list[set[str]] = [
    {"errors", "files", "patterns"},
    {"config", "heap", "parallel", "preflight"},
    {"spec"},
    {"naming"},
    {"quant"},
    {"calib"},
    {"arch"},
    {"algo"},
    {"kernels"},
    {"nn"},
    {"runtime"},
    {"io"},
    {"zoo"},
    {"targets"},
    {"rounding", "refine"},
    {"pipeline"},
    {"engine"},
    {"report"},
    {"bench"},
    {"eval"},
    {"api"},
    {"platform"},
    {"demo"},
    {"commands"},
    {"cli"},
]
LEVEL = {unit: i for i, units in enumerate(LEVELS) for unit in units}


def _unit(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, imported awqkit unit)`` for every runtime import of another unit in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_nodes(tree)
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] if node.module != "awqkit" else [f"awqkit.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        units = [n.split(".")[1] for n in names if n.startswith("awqkit.")]
        # `from awqkit import __version__` names the root package's attribute, not a unit
        found += [(node.lineno, u) for u in units if (SRC / u).is_dir() or (SRC / f"{u}.py").is_file()]
    return found


def test_every_unit_has_a_level() -> None:
    units = {_unit(p) for p in SRC.rglob("*.py") if p.name != "__init__.py" or p.parent != SRC}
    assert units <= set(LEVEL), f"add these to LEVELS: {sorted(units - set(LEVEL))}"


def test_imports_point_down_only() -> None:
    upward = []
    for path in sorted(SRC.rglob("*.py")):
        if path.parent == SRC and path.name == "__init__.py":
            continue
        unit = _unit(path)
        for line, target in _imports(path):
            if target != unit and LEVEL[target] >= LEVEL[unit]:
                upward.append(f"{path.relative_to(SRC.parent)}:{line}: {unit} imports {target}")
    assert not upward, "imports that do not point down (see LEVELS):\n" + "\n".join(upward)


# where an awqkit import may sit inside a function: the command layer loads each command when it runs (so
# `awqkit --help` imports no torch), and the kernel registry registers its built-in backends on first use
LAZY_IMPORTS_ALLOWED = {"cli.py", "commands", "kernels/__init__.py"}


def test_awqkit_imports_are_at_module_level() -> None:
    """Function-level imports hid the package cycles this layout removed; only optional dependencies and the
    command layer import inside functions."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel in LAZY_IMPORTS_ALLOWED or rel.split("/")[0] in LAZY_IMPORTS_ALLOWED:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                mod = node.module if isinstance(node, ast.ImportFrom) else None
                if isinstance(node, ast.Import):
                    mod = node.names[0].name
                if mod is not None and (mod == "awqkit" or mod.startswith("awqkit.")):
                    found.append(f"{rel}:{node.lineno} in {fn.name}(): {mod}")
    assert not found, "move these imports to the top of their module:\n" + "\n".join(found)
