"""The import contract of DESIGN.md, checked on the source: each layer imports only the layers below it.

    core  <-  calibration  <-  eval  <-  testbed  <-  apps  <-  cli

Every `import adatoken...` counts, at module level or inside a function (a lazy import is still a
dependency). The package root (`adatoken/__init__.py`, the public API) and `__main__` sit outside the
layers. Within core, only the adapters and the model table know transformers, and no library module
parses arguments.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "adatoken"
LAYERS = ["core", "calibration", "eval", "testbed", "apps", "cli"]  # lowest first
TRANSFORMERS_IN_CORE = {"adatoken.core.adapters", "adatoken.core.models"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every name `path` imports, absolute: `import a.b` gives a.b, `from a.b import c` gives a.b.c."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def from_root(name: str) -> bool:
    """`import adatoken` or a name of the package root's public API (`from adatoken import prune`)."""
    parts = name.split(".")
    return parts[0] == "adatoken" and (len(parts) == 1 or parts[1] not in LAYERS)


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "adatoken" and parts[1] in LAYERS else None


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_is_in_a_layer():
    outside = sorted(m for m in MODULES if layer(m) is None and m not in ("adatoken", "adatoken.__main__"))
    assert outside == [], f"modules outside the layers {LAYERS}: {outside}"


@pytest.mark.parametrize("module", [m for m in MODULES if layer(m)])
def test_imports_point_down(module):
    own = LAYERS.index(layer(module))
    found = imports(MODULES[module])
    upward = sorted(name for name in found if layer(name) and LAYERS.index(layer(name)) > own)
    assert upward == [], f"{module} ({layer(module)}) imports from a higher layer: {upward}"
    root = sorted(name for name in found if from_root(name))
    assert root == [], f"{module} imports {root} from the package root; import from the layer that defines it"
    if layer(module) != "cli":
        assert "argparse" not in found, f"{module} parses arguments: that belongs in adatoken.cli"
    if layer(module) == "core" and module not in TRANSFORMERS_IN_CORE:
        assert not any(n.split(".")[0] == "transformers" for n in found), \
            f"{module} imports transformers; in core only {sorted(TRANSFORMERS_IN_CORE)} may"


def test_the_contract_catches_an_upward_import(tmp_path):
    """The checker itself: a core module importing the CLI is caught."""
    source = tmp_path / "bad.py"
    source.write_text("def f():\n    from adatoken.cli.common import reproducing_command\n")
    assert {layer(n) for n in imports(source)} - {None} == {"cli"}
