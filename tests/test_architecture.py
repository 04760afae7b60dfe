"""The package's import graph runs one way: models/inputs/hub <- parallel <- convert <- generation <-
serving/training <- api <- recipes/aot <- cli, with no cycle, and every module imports in a fresh interpreter.

The graph is read from the source (every import statement, at module level or inside a function), so an
import hidden in a function to dodge a cycle counts like any other.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Layer of each part of the package: a module may import only from its own part or from a lower layer.
# Two parts on the same layer (models and inputs, serving and training) do not import each other.
LAYERS = {
    "cogvlm_jax.files": 0, "cogvlm_jax.config": 0, "cogvlm_jax.dtypes": 0,
    "cogvlm_jax.models": 1, "cogvlm_jax.inputs": 1, "cogvlm_jax.hub": 1, "cogvlm_jax.grounding": 1,
    "cogvlm_jax.parallel": 2,
    "cogvlm_jax.convert": 3,
    "cogvlm_jax.generation": 4,
    "cogvlm_jax.serving": 5, "cogvlm_jax.training": 5,
    "cogvlm_jax.api": 6,
    "cogvlm_jax.recipes": 7, "cogvlm_jax.aot": 7,
    "cogvlm_jax.cli": 8, "cogvlm_jax": 8,
}


def _modules() -> dict[str, str]:
    """Dotted name -> file, for every module of the installed package (convert/ is cogvlm_jax.convert)."""
    out = {}
    for top, prefix in (("cogvlm_jax", ["cogvlm_jax"]), ("convert", ["cogvlm_jax", "convert"])):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            rel = os.path.relpath(dirpath, os.path.join(ROOT, top))
            parts = prefix + ([] if rel == "." else rel.split(os.sep))
            for f in files:
                if f.endswith(".py"):
                    name = parts + ([] if f == "__init__.py" else [f[:-3]])
                    out[".".join(name)] = os.path.join(dirpath, f)
    return out


MODULES = _modules()


def _part(module: str) -> str:
    """The LAYERS key a module belongs to (the longest matching prefix)."""
    best = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len, default=None)
    assert best is not None, f"{module} belongs to no layer in LAYERS: add its folder there"
    return best


def _imports(module: str) -> set[str]:
    """Our modules that ``module`` imports (``from a import b`` counts as ``a.b`` when that is a module)."""
    tree = ast.parse(open(MODULES[module]).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:
                base = ".".join(module.split(".")[:-node.level] + [base])
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for n in names:
            assert not n.startswith(("convert.", "benchmarks")) and n not in ("convert", "benchmarks"), \
                f"{module} imports {n}: the package never imports the checkout's top-level folders"
            if n in MODULES and n != module:
                found.add(n)
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def test_imports_run_down_the_layers():
    wrong = []
    for m, deps in GRAPH.items():
        pm = _part(m)
        for d in deps:
            pd = _part(d)
            if d == "cogvlm_jax" or pd == pm:
                if d == "cogvlm_jax" and m != "cogvlm_jax.cli":
                    wrong.append(f"{m} imports the package root")
                continue
            if LAYERS[pd] >= LAYERS[pm]:
                wrong.append(f"{m} (layer {LAYERS[pm]}) imports {d} (layer {LAYERS[pd]})")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle():
    state, cycles = {}, []

    def visit(m, path):
        state[m] = 1
        for d in sorted(GRAPH[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_every_module_imports_in_a_fresh_interpreter():
    # lowest layers first, so a module that only imports because a higher one was imported first fails
    order = sorted(MODULES, key=lambda m: (LAYERS[_part(m)], m))
    code = "import importlib\nfor m in %r:\n    importlib.import_module(m)\n" % (order,)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_every_package_folder_is_installed():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    packages = {m for m, path in MODULES.items() if path.endswith("__init__.py")}
    assert packages == listed, f"pyproject.toml [tool.setuptools] packages differ: missing " \
                               f"{sorted(packages - listed)}, extra {sorted(listed - packages)}"
