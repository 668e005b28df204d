"""The package's import graph: every module imports only the layers below its own, and no
module imports another that imports it back.

    cli -> engine_comparison -> predict, inference, paddleclas -> api -> engines -> ops
        -> models, checkpoint, _extension, kernels
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dpn_fast"

# Higher imports lower, and modules of one subpackage import each other.
LAYERS = {"_extension": 0, "kernels": 0, "checkpoint": 0, "data": 0, "models": 1, "ops": 2,
          "engines": 3, "torch": 4, "api": 4, "inference": 5, "predict": 5, "paddleclas": 5,
          "engine_comparison": 6, "cli": 7}


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name):
    path = PACKAGE.parent / name.replace(".", "/")
    return path.is_dir() or path.with_suffix(".py").exists()


def imports(path):
    """dpn_fast modules `path` imports, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("dpn_fast")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dpn_fast"):
            # `from package import module` imports the module; `from module import name`, it.
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                names.add(submodule if is_module(submodule) else node.module)
    return names


def graph():
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def top_level(module):
    return module.split(".")[1] if "." in module else None


def test_every_module_imports_only_downward():
    wrong = []
    for module, targets in graph().items():
        own = top_level(module)
        if own is None:  # the package's __init__ re-exports the public API
            continue
        for target in targets:
            other = top_level(target)
            if other is None:
                wrong.append(f"{module} imports the package root (import the module it needs)")
            elif other != own and LAYERS[other] >= LAYERS[own]:
                wrong.append(f"{module} (layer {LAYERS[own]}) imports {target} "
                             f"(layer {LAYERS[other]})")
    assert not wrong, "\n".join(wrong)


def test_every_module_has_a_layer():
    assert {top_level(m) for m in graph()} - {None} <= set(LAYERS)


def test_models_import_no_ops_or_engines():
    for module, targets in graph().items():
        if top_level(module) == "models":
            assert not {t for t in targets if top_level(t) in ("ops", "engines")}, module


def test_no_import_cycle():
    edges = graph()
    known = set(edges)
    state = {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(t for t in edges[module] if t in known):
            if state.get(target) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path + [target]))
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
