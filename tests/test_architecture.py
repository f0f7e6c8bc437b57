"""The package import graph: lower layers never import higher ones, library code imports at the top.

Layers, lowest first. A module may import its own layer and those below it. `drprune.cli` and every
`drprune.<area>.cli` form the top layer, the only place imports may be deferred (into the command
functions, so `drprune --help` stays fast). Imports under `if TYPE_CHECKING:` are annotations, not
dependencies, and are not counted. The remote-code files shipped into HF folders import nothing of ours.
"""
from __future__ import annotations

import ast
from pathlib import Path

import drprune

PACKAGE = Path(drprune.__file__).parent
LAYERS = [
    {"drprune", "errors", "paths", "registry", "atomic", "plots", "cli_options", "precision", "run_files", "progress",
     "dtypes", "compute", "node_checks"},
    {"models"},
    {"mixture"},
    {"run_config"},
    {"convert"},
    {"masks"},
    {"compact"},
    {"data"},
    {"eval"},
    {"oneshot"},
    {"callbacks"},
    {"run_guard"},
    {"resume", "parallel"},
    {"train"},
    {"plan"},
    {"demo"},
    {"cli"},
]
STANDALONE = {"drprune.compact.modeling_drprune", "drprune.compact.configuration_drprune"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    parts = module.split(".")
    unit = "cli" if parts[-1] == "cli" else (parts[1] if len(parts) > 1 else "drprune")
    return next(i for i, names in enumerate(LAYERS) if unit in names)


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported drprune module, line, at top level) for every import outside TYPE_CHECKING blocks."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for block in tree.body if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for n in ast.walk(block)}
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "drprune":
            out.append((node.module, node.lineno, id(node) in top))
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno, id(node) in top) for a in node.names if a.name.split(".")[0] == "drprune"]
    return out


def library_modules() -> dict[str, Path]:
    mods = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: p for m, p in mods.items() if m not in STANDALONE}


def test_every_module_has_a_layer():
    for module in library_modules():
        assert layer(module) >= 0


def test_no_import_runs_from_a_lower_layer_to_a_higher_one():
    wrong = [f"{module}:{line} imports {target} (layer {layer(target)} > {layer(module)})"
             for module, path in library_modules().items() for target, line, _ in imports(path)
             if layer(target) > layer(module)]
    assert not wrong, "\n".join(wrong)


def test_library_code_imports_at_the_top():
    cli = len(LAYERS) - 1
    deferred = [f"{module}:{line} imports {target} inside a function"
                for module, path in library_modules().items() if layer(module) != cli
                for target, line, top in imports(path) if not top]
    assert not deferred, "\n".join(deferred)


def test_no_import_cycle_between_library_modules():
    mods = library_modules()
    graph = {m: {t if t in mods else t.rpartition(".")[0] for t, _, top in imports(p) if top} & set(mods) - {m}
             for m, p in mods.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1 and not t == "drprune":  # every module imports its package's __init__
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(mods):
        if m not in state:
            visit(m, [m])
