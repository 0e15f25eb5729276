"""The package flows one way: no import cycle, no import of a higher layer, and imports inside functions
only where the dependency is optional (triton: the kernels run only where it is installed).

The layers are the ones ``cce_inductor/README.md`` draws, bottom first. The imports are read from the
sources (``ast``), module-level and function-level alike, so an import hidden in a function to dodge a
cycle is caught too.
"""
from __future__ import annotations

import ast
import fnmatch
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "cce_inductor"

# Bottom first; a module may import its own layer or lower ones (never a cycle).
LAYERS = [
    ("shared helpers", ["config", "options", "logging_", "core", "core.*", "paths", "reference"]),
    ("implementations", ["torch_impl", "torch_impl.*", "kernels", "kernels.*"]),
    ("implementation selection", ["select"]),
    ("custom ops", ["ops", "ops.*", "distributed.vocab_parallel"]),
    ("dispatch", ["dispatch", "distributed.local", "distributed.dtensor"]),
    ("public API", ["api", "distributed", "distributed.functional"]),
    ("graph rewrite", ["rewrite", "rewrite.*"]),
    ("backend and report", ["backend", "explain", "graph_breaks", "integrations", "integrations.*"]),
    ("package", [""]),
]
# Function-level imports of our own modules allowed only where a dependency is optional: who -> what.
OPTIONAL = {("select", "kernels")}


def _modules() -> dict:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _layer(module: str) -> int:
    for i, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return i
    raise AssertionError(f"cce_inductor.{module} is in no layer of tests/test_layers.py: add it")


def _imports(module: str, path: pathlib.Path, known: dict):
    """(imported module, at module level?) for each import of one of our modules."""
    is_pkg = path.name == "__init__.py"
    base = module.split(".") if module else []
    if not is_pkg:
        base = base[:-1]
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                root = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                mod = ".".join(root + ([node.module] if node.module else []))
            elif node.module and (node.module == "cce_inductor" or node.module.startswith("cce_inductor.")):
                mod = node.module[len("cce_inductor."):] if node.module != "cce_inductor" else ""
            else:
                continue
            for alias in node.names:  # "from . import config" names a module
                sub = f"{mod}.{alias.name}" if mod else alias.name
                targets.append(sub if sub in known else mod)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("cce_inductor."):
                    targets.append(alias.name[len("cce_inductor."):])
        for t in targets:
            if t != module and t in known:
                yield t, id(node) in top


def test_one_way_down():
    known = _modules()
    edges, problems = {}, []
    for module, path in sorted(known.items()):
        for target, top_level in _imports(module, path, known):
            if _layer(target) > _layer(module):
                problems.append(f"{module or '__init__'} ({LAYERS[_layer(module)][0]}) imports {target} "
                                f"({LAYERS[_layer(target)][0]}): an upward import")
            if not top_level and (module, target) not in OPTIONAL:
                problems.append(f"{module} imports {target} inside a function (not an optional dependency)")
            edges.setdefault(module, set()).add(target)
    assert not problems, "\n".join(problems)

    def cycle_from(start, node, seen):
        for nxt in sorted(edges.get(node, ())):
            if nxt == start:
                return [node, nxt]
            if nxt not in seen:
                seen.add(nxt)
                rest = cycle_from(start, nxt, seen)
                if rest:
                    return [node] + rest
        return None
    for module in sorted(edges):
        cycle = cycle_from(module, module, set())
        assert cycle is None, "import cycle: " + " -> ".join(cycle)
