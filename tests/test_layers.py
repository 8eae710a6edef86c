"""The tree is the pipeline: each stage imports only the stages below it, never another module's private names,
and no two modules import each other (directly or round a cycle)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "abliterate"

# Lowest first. A module may import its own stage and any stage before it.
STAGES = ["version", "errors", "plugins", "core", "measure", "ship", "search", "use", "choose", "cli"]
TOP = ["__init__"]  # the Python API re-exports the stages


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path) -> list[tuple[str, str, int]]:
    """(module imported, name taken from it or "", line) for every abliterate import, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "abliterate":
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if (PACKAGE.parent / submodule.replace(".", "/")).with_suffix(".py").exists() or \
                        (PACKAGE.parent / submodule.replace(".", "/") / "__init__.py").exists():
                    found.append((submodule, "", node.lineno))
                else:
                    found.append((node.module, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, "", node.lineno) for alias in node.names if alias.name.split(".")[0] == "abliterate"]
    return found


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_belongs_to_a_stage():
    stray = [name for name in MODULES if stage_of(name) not in STAGES + TOP]
    assert not stray, f"modules outside the stages {STAGES}: {stray}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down_and_take_no_private_names(name):
    if stage_of(name) in TOP:
        return
    rank = STAGES.index(stage_of(name))
    for imported, taken, line in imports_of(MODULES[name]):
        assert imported != "abliterate", f"{name}:{line} imports {taken} from the package root (the top level)"
        assert STAGES.index(stage_of(imported)) <= rank, \
            f"{name}:{line} imports {imported}: stage {stage_of(imported)} is above {stage_of(name)}"
        private = [part for part in (imported.split(".") + [taken]) if part.startswith("_") and not part.startswith("__")]
        assert not private, f"{name}:{line} imports the private name {private[0]} from {imported}"


def test_no_import_cycles():
    graph = {name: {imported if imported in MODULES else imported.rsplit(".", 1)[0]
                    for imported, _, _ in imports_of(path)} & set(MODULES) - {name}
             for name, path in MODULES.items()}
    # packages' __init__ re-exports are part of the package, not a cycle through it
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for following in sorted(graph[node]):
            if state.get(following) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(following):] + [following]))
            if following not in state:
                visit(following)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_function_longer_than_a_screen_or_two():
    """A function that loads, edits, generates and evaluates at once is several functions."""
    too_long = [f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
                for name, path in MODULES.items() for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80]
    assert not too_long, f"split these: {too_long}"
