"""kit's layout: packages are pipeline stages and every import points down.

The checker reads the imports with `ast` (nothing is imported) and reports, for a source tree:
- an import from a lower layer into a higher one (the order is LAYERS, written once, here);
- an import cycle between modules (package cycles cannot exist once every arrow points down);
- a `_private` name imported from another module;
- an import inside a function outside kit/cli/ without a comment saying why (on its line or the
  line above): such imports hide the graph, so each one must be a deliberate choice.
A second test proves the checker can fail: it adds a back-import to a copy of kit and expects it
to be reported.
"""

from __future__ import annotations

import ast
import shutil
from dataclasses import dataclass
from pathlib import Path

KIT = Path(__file__).resolve().parents[1] / "kit"

# Bottom-up. A module may import from its own layer and the layers before it.
LAYERS = ("core", "base", "data", "ingest", "ground", "generate", "review", "train", "infer", "eval", "prefer", "merge", "export", "serve", "adapt", "cli")
TOP_LEVEL = {"kit": "core", "kit.__main__": "cli"}


@dataclass
class Edge:
    importer: str
    imported: str
    names: list[str]
    line: int
    in_function: bool
    commented: bool


def module_name(root: Path, path: Path) -> str:
    parts = ["kit", *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    if module in TOP_LEVEL:
        return TOP_LEVEL[module]
    return module.split(".")[1]


def read_edges(root: Path) -> tuple[set[str], list[Edge]]:
    files = {module_name(root, p): p for p in root.rglob("*.py")}
    edges: list[Edge] = []
    for mod, path in files.items():
        source = path.read_text()
        lines = source.splitlines()
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]

        def commented(node: ast.stmt) -> bool:
            here = lines[node.lineno - 1]
            above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
            return "#" in here or above.startswith("#")

        def visit(node: ast.AST, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if isinstance(child, ast.Import):
                    for alias in child.names:
                        if alias.name == "kit" or alias.name.startswith("kit."):
                            edges.append(Edge(mod, alias.name, [], child.lineno, in_function, commented(child)))
                elif isinstance(child, ast.ImportFrom):
                    if child.level:
                        base = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                        target = ".".join(base + ([child.module] if child.module else []))
                    else:
                        target = child.module or ""
                    if target == "kit" or target.startswith("kit."):
                        for alias in child.names:
                            sub = f"{target}.{alias.name}"
                            imported = sub if sub in files else target
                            names = [] if imported == sub else [alias.name]
                            edges.append(Edge(mod, imported, names, child.lineno, in_function, commented(child)))
                visit(child, inner)

        visit(ast.parse(source), False)
    return set(files), edges


def cycles(modules: set[str], edges: list[Edge]) -> list[list[str]]:
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for e in edges:
        if e.imported in graph and e.imported != e.importer:
            graph[e.importer].add(e.imported)
    found, state, stack = [], {}, []

    def walk(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                found.append(stack[stack.index(n):] + [n])
            elif n not in state:
                walk(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            walk(m)
    return found


def problems(root: Path) -> list[str]:
    modules, edges = read_edges(root)
    out = []
    for e in edges:
        where = f"{e.importer} (line {e.line})"
        if e.imported not in modules and e.imported != "kit":
            out.append(f"{where} imports {e.imported}, which does not exist")
            continue
        low, high = LAYERS.index(layer_of(e.importer)), LAYERS.index(layer_of(e.imported))
        if high > low:
            out.append(f"{where} imports {e.imported}: layer '{layer_of(e.importer)}' may not import the higher layer '{layer_of(e.imported)}'")
        private = [n for n in e.names if n.startswith("_") and not n.startswith("__")]
        if private and e.imported != e.importer:
            out.append(f"{where} imports private {', '.join(private)} from {e.imported}")
        if e.in_function and layer_of(e.importer) != "cli" and not e.commented:
            out.append(f"{where} imports {e.imported} inside a function without a comment saying why")
    out += [f"import cycle: {' -> '.join(c)}" for c in cycles(modules, edges)]
    return out


def test_kit_imports_point_down_without_cycles_or_private_names():
    found = problems(KIT)
    assert not found, "\n".join(found)


def test_every_package_is_a_layer():
    packages = {p.name for p in KIT.iterdir() if (p / "__init__.py").is_file()}
    modules = {p.stem for p in KIT.glob("*.py")} - {"__init__", "__main__"}
    assert packages | modules == set(LAYERS), "add new packages to LAYERS in their place in the pipeline"


def test_the_checker_catches_a_back_import_a_cycle_and_a_private_name(tmp_path):
    copy = tmp_path / "kit"
    shutil.copytree(KIT, copy, ignore=shutil.ignore_patterns("__pycache__", "assets"))
    errors = copy / "core" / "errors.py"
    errors.write_text(errors.read_text() + "\nfrom kit.train.plan import RunPlan\n")
    (copy / "data" / "sampler.py").write_text((copy / "data" / "sampler.py").read_text() + "\nfrom kit.data.dataset import IGNORE\n")
    (copy / "data" / "dataset.py").write_text((copy / "data" / "dataset.py").read_text() + "\nfrom kit.data.sampler import _grouped\n")
    (copy / "infer" / "prompts.py").write_text((copy / "infer" / "prompts.py").read_text() + "\n\ndef f():\n    from kit.core import files\n")
    found = problems(copy)
    assert any("kit.core.errors" in p and "higher layer 'train'" in p for p in found), found
    assert any(p.startswith("import cycle:") and "kit.data.sampler" in p for p in found), found
    assert any("private _grouped" in p for p in found), found
    assert any("kit.infer.prompts" in p and "without a comment" in p for p in found), found


def test_benchmarks_use_kit_by_its_public_names():
    """benchmarks/ are kit's users too: they import modules that exist and no `_private` name."""
    modules, _ = read_edges(KIT)
    found = []
    for path in sorted((KIT.parent / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "kit":
                if node.module not in modules and node.module != "kit":
                    found.append(f"{path.name} (line {node.lineno}) imports {node.module}, which does not exist")
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private:
                    found.append(f"{path.name} (line {node.lineno}) imports private {', '.join(private)} from {node.module}")
    assert not found, "\n".join(found)


def positional_calls(root: Path) -> list[str]:
    """Calls in `root` that pass more than three positional arguments to a function or class defined
    there (by name: a name kit defines is kit's wherever it is called)."""
    trees = {f: ast.parse(f.read_text(encoding="utf-8")) for f in sorted(root.rglob("*.py"))}
    defined = {n.name for t in trees.values() for n in ast.walk(t)
               if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    found = []
    for f, tree in trees.items():
        for n in ast.walk(tree):
            if not isinstance(n, ast.Call):
                continue
            name = n.func.id if isinstance(n.func, ast.Name) else n.func.attr if isinstance(n.func, ast.Attribute) else None
            if name in defined and sum(not isinstance(a, ast.Starred) for a in n.args) > 3:
                found.append(f"{f.relative_to(root.parent)}:{n.lineno} {name}")
    return found


def test_calls_with_more_than_three_arguments_name_them(tmp_path):
    """Past three, arguments are passed by keyword: a reader sees what each one is, and a signature
    change cannot shift them silently. The check can fail: a copy with one such call is caught."""
    assert positional_calls(KIT) == []
    copy = tmp_path / "kit"
    shutil.copytree(KIT, copy)
    (copy / "core" / "extra.py").write_text("from kit.core.errors import KitError\n\n\ndef f(a, b, c, d):\n    return f(a, b, c, d)\n")
    assert positional_calls(copy) == ["kit/core/extra.py:5 f"]
