"""The package's layers: every module imports only from layers below it."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "optaxclip"

# Bottom to top (DESIGN.md, "Layout: layers"). Modules of one layer do not
# import each other either.
LAYERS = [
    ["_checks"],
    ["_tree"],
    ["_numerics"],
    ["_mesh"],
    ["_xla"],
    ["_norms"],
    ["rules"],
    ["_stats"],
    ["_core"],
    ["_scopes"],
    ["_clipping"],
    ["_presets", "_guards", "_per_example"],
    ["diagnostics", "_metrics"],
    ["__init__"],
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}

# Imports that point down but skip what the layer should use (DESIGN.md):
# rules know nothing of how a measurement is made; the core knows no concrete
# scope, preset or measuring recipe; presets use the public functions; the
# guards and per-example clipping are their own scopes.
FORBIDDEN = {
    "rules": {"_tree", "_numerics", "_mesh", "_xla", "_norms"},
    "_core": {"_norms", "_mesh", "_xla", "_scopes"},
    "_norms": {"rules"},
    "_presets": {"_scopes", "_core"},
    "_guards": {"_scopes", "_clipping"},
    "_per_example": {"_scopes", "_clipping"},
}


def package_imports(path: pathlib.Path) -> set[str]:
    """The package modules ``path`` imports (relative or absolute)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module is None:
                found.update(alias.name for alias in node.names)
            elif node.level == 1:
                found.add(node.module.split(".")[0])
            elif node.module and node.module.startswith("optaxclip."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("optaxclip."):
                    found.add(alias.name.split(".")[1])
    return found


def test_every_module_has_a_layer():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules == set(LAYER), (
        f"modules without a layer: {sorted(modules - set(LAYER))}; "
        f"layers without a module: {sorted(set(LAYER) - modules)}"
    )


@pytest.mark.parametrize("module", sorted(LAYER))
def test_imports_point_down(module):
    path = PACKAGE / f"{module}.py"
    upward = {
        name
        for name in package_imports(path)
        if name in LAYER and LAYER[name] >= LAYER[module]
    }
    assert not upward, (
        f"optaxclip/{module}.py (layer {LAYER[module]}) imports "
        f"{sorted(upward)} from its own layer or above"
    )


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_no_import_skips_its_layer(module):
    found = package_imports(PACKAGE / f"{module}.py") & FORBIDDEN[module]
    assert not found, f"optaxclip/{module}.py imports {sorted(found)}"


def test_the_core_names_no_concrete_rule():
    # `fresh_state` once asked whether the rule was `fixed` or `scheduled`;
    # a rule with no state to learn is now recognized by its state.
    tree = ast.parse((PACKAGE / "_core.py").read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "rules"
        for alias in node.names
    }
    assert imported <= {"Observation", "Rule", "observe"}, imported


def test_the_layer_check_sees_an_upward_import(tmp_path):
    # The parser finds each spelling of an import of a package module.
    source = (
        "from . import _core, rules\n"
        "from ._scopes import clip_by_norm\n"
        "import optaxclip._presets\n"
        "from optaxclip.diagnostics import suggest_threshold\n"
    )
    path = tmp_path / "m.py"
    path.write_text(source)
    assert package_imports(path) == {
        "_core",
        "rules",
        "_scopes",
        "_presets",
        "diagnostics",
    }


def test_matplotlib_is_imported_only_when_plotting():
    code = (
        "import sys, optaxclip, optaxclip.diagnostics\n"
        "print('matplotlib' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_rules_exports_rules_only():
    # Rules, their states, the protocol (with the observation and the call
    # that passes it) and the threshold alias; the argument checks live in a
    # private module.
    import typing

    from optaxclip import rules

    for name in rules.__all__:
        obj = getattr(rules, name)
        if name in {"Rule", "Observes", "Threshold", "as_rule", "observe"}:
            continue
        if name.endswith("State") or name == "Observation":
            assert issubclass(obj, tuple) and hasattr(obj, "_fields"), name
            continue
        instance = obj(1.0) if name == "fixed" else None
        if name == "scheduled":
            instance = obj(lambda step: 1.0)
        instance = instance or obj()
        assert isinstance(instance, rules.Rule), name
    assert typing.get_args(rules.Threshold), "Threshold is a Union alias"
    assert not [n for n in rules.__all__ if n.startswith("check")]
