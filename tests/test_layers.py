"""The layer contract of docs/architecture.md, checked on the source: every `import` of every module of the package
(inside functions and `if TYPE_CHECKING:` blocks included) must point to a lower layer or to the module's own group,
and the import graph must have no cycle.

A module may import from a lower level, or from its own group; groups that share a level never import each other
(data and modeling, loading and training and verifiers, sft / dpo / anneal / grpo / pairs).
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "yulan_tune"

# Lowest level first. Each level is a list of groups; each group a list of module prefixes.
CONTRACT: list[list[list[str]]] = [
    [["yulan_tune.paths", "yulan_tune.conventions", "yulan_tune.console"]],
    [["yulan_tune.data"], ["yulan_tune.modeling"]],
    [["yulan_tune.loading"], ["yulan_tune.training"], ["yulan_tune.verifiers"]],
    [["yulan_tune.evaluation"], ["yulan_tune.export"], ["yulan_tune.chat_session"], ["yulan_tune.generation"]],
    [["yulan_tune.pretrain"]],
    [["yulan_tune.tiny"]],
    [["yulan_tune.sft"], ["yulan_tune.dpo"], ["yulan_tune.anneal"], ["yulan_tune.grpo"], ["yulan_tune.pairs"]],
    [["yulan_tune.quickstart"], ["yulan_tune.app"], ["yulan_tune.rejection_sampling"]],
    [["yulan_tune.commands"]],
    [["yulan_tune.cli", "yulan_tune"]],
]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules(root: Path, package: str) -> dict[str, Path]:
    return {module_name(path, root): path for path in sorted((root / package).rglob("*.py"))}


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """Our modules that `path` imports anywhere in its body, resolved to the most specific module that exists
    (`from yulan_tune.data import chat` is an import of `yulan_tune.data.chat`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target:
                found.add(target)
                break  # `from a import b`: the submodule if it exists, else the module itself
    found.discard(name)
    return found


def placement(module: str, contract: list[list[list[str]]]) -> tuple[int, int] | None:
    """(level, group) of the longest matching prefix."""
    best, best_length = None, -1
    for level, groups in enumerate(contract):
        for group, prefixes in enumerate(groups):
            for prefix in prefixes:
                if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                    best, best_length = (level, group), len(prefix)
    return best


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def check_layers(root: Path, package: str, contract: list[list[list[str]]]) -> tuple[list[str], list[list[str]]]:
    """(violations, cycles) of the package under `root`."""
    modules = package_modules(root, package)
    graph = {name: imported_modules(path, name, set(modules)) for name, path in modules.items()}
    violations = []
    for name, targets in sorted(graph.items()):
        source = placement(name, contract)
        if source is None:
            violations.append(f"{name}: not placed in the layer contract")
            continue
        for target in sorted(targets):
            destination = placement(target, contract)
            if destination is None:
                violations.append(f"{name} -> {target}: {target} is not placed in the layer contract")
            elif destination[0] > source[0]:
                violations.append(f"{name} -> {target}: imports a higher layer")
            elif destination[0] == source[0] and destination[1] != source[1]:
                violations.append(f"{name} -> {target}: imports a sibling group of its own layer")
    return violations, find_cycles(graph)


def test_package_follows_the_layer_contract():
    violations, cycles = check_layers(REPO, PACKAGE, CONTRACT)
    assert cycles == [], f"import cycles: {cycles}"
    assert violations == [], "imports against the layer contract:\n" + "\n".join(violations)


def test_scripts_enter_through_commands():
    """Launchable scripts (recipes/*.py, apps/*.py, pretrain/*.py) are thin: they import our command layer only."""
    known = set(package_modules(REPO, PACKAGE))
    offenders = []
    for folder in ("recipes", "apps", "pretrain"):
        for path in sorted((REPO / folder).glob("*.py")):
            for target in imported_modules(path, f"{folder}.{path.stem}", known):
                if placement(target, CONTRACT)[0] < len(CONTRACT) - 2 and target != "yulan_tune.paths":
                    offenders.append(f"{path.relative_to(REPO)} -> {target}")
    assert offenders == []


def test_checker_finds_cycles_and_upward_imports(tmp_path):
    """The checker itself: a package with a cycle and an import against the contract is reported."""
    package = tmp_path / "pkg"
    (package / "low").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "low" / "__init__.py").write_text("")
    (package / "low" / "a.py").write_text("from pkg.low import b\n")
    (package / "low" / "b.py").write_text(textwrap.dedent("""
        def later():
            from pkg.low.a import something  # a cycle hidden inside a function
            from ..high import run  # relative, upward
    """))
    (package / "high.py").write_text("from .low import a\n")
    (package / "side.py").write_text("import pkg.high\n")
    contract = [[["pkg.low"]], [["pkg.high"], ["pkg.side"]], [["pkg"]]]
    violations, cycles = check_layers(tmp_path, "pkg", contract)
    assert cycles == [["pkg.high", "pkg.low.a", "pkg.low.b"]]
    assert violations == ["pkg.low.b -> pkg.high: imports a higher layer",
                          "pkg.side -> pkg.high: imports a sibling group of its own layer"]


@pytest.mark.parametrize("bad_import", ["from yulan_tune.pretrain import PretrainRecipe",
                                        "from yulan_tune.modeling.yulanmini import YuLanMiniConfig"])
def test_checker_fails_on_the_real_package_with_one_bad_import(tmp_path, bad_import):
    """One import against the contract, added to a copy of the real data layer, is caught."""
    import shutil

    shutil.copytree(REPO / PACKAGE, tmp_path / PACKAGE)
    chat = tmp_path / PACKAGE / "data" / "chat.py"
    chat.write_text(chat.read_text() + f"\n\ndef _late():\n    {bad_import}\n")
    violations, _ = check_layers(tmp_path, PACKAGE, CONTRACT)
    assert len(violations) == 1 and violations[0].startswith("yulan_tune.data.chat -> ")
