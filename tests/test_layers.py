"""Imports point only down the layers: a module may import from its own folder and from the
folders listed before it, never after (README, Architecture)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "gptcli"
# Generation (infer) sits beneath training and evaluation, which call it (RL rollouts,
# generation-task evaluation); train and evals share a level: neither imports the other.
LAYERS = ["", "data", "model", "store", "infer", "train", "evals", "tasks", "serve", "cli"]  # "": the top
SIDE_BY_SIDE = {("train", "evals"), ("evals", "train")}
TOP_FOLDERS = ["families"]  # folders in the top layer (plain data config.py reads)


def layer_of(module: str) -> int:
    """The layer of a dotted module name under gptcli (`gptcli.store.rundir` -> store)."""
    parts = module.split(".")[1:]
    folder = parts[0] if len(parts) > 1 and parts[0] in LAYERS else ""
    return LAYERS.index(folder)


def imports(path: Path) -> list[str]:
    """Every gptcli module a file imports, at the top or inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gptcli"):
            if node.module == "gptcli":  # `from gptcli import config`
                found += [f"gptcli.{alias.name}" for alias in node.names]
            else:
                found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith("gptcli")]
    return found


def test_imports_point_only_down_the_layers():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(("gptcli", *path.relative_to(PACKAGE).with_suffix("").parts))
        if path.name == "__main__.py":
            continue  # the entry point runs the CLI
        for target in imports(path):
            if layer_of(target) > layer_of(module) or (folder_of(module), folder_of(target)) in SIDE_BY_SIDE:
                wrong.append(f"{module} imports {target}")
    assert wrong == []


def folder_of(module: str) -> str:
    return LAYERS[layer_of(module)]


def test_every_module_is_in_a_known_folder():
    """Every module sits in a layer's folder (data/ groups its modules in folders by concern)."""
    folders = {p.relative_to(PACKAGE).parts[0] for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE}
    assert folders <= set(LAYERS) | set(TOP_FOLDERS), folders - set(LAYERS) - set(TOP_FOLDERS)
