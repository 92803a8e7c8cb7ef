"""Imports flow one way: no module of hf_finetune imports another that imports it back,
function-level imports included (DESIGN.md, "Structure")."""

import ast
from pathlib import Path

import hf_finetune

PACKAGE = Path(hf_finetune.__file__).parent


def module_files(root=PACKAGE):
    """{dotted module name: file} for every module of the package."""
    modules = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def import_graph(modules):
    """{module: modules it imports}, from every import statement in the file (nested ones
    too). Importing a.b.c runs a/__init__ and a/b/__init__ first, so those count as
    imported, except the importer's own parent packages."""
    package = next(iter(modules)).split(".")[0]

    def known(name):  # `from x import y`: y is a module or a name in module x
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {name: set() for name in modules}
    for name, path in modules.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] != package:
                    continue
                target = known(target)
                while target and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
                    target = target.rpartition(".")[0]
    return graph


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_in_the_package():
    graph = import_graph(module_files())
    assert len(graph) > 20 and graph["hf_finetune.run"], "the walk found the package's imports"
    assert cycles(graph) == []


def test_the_walk_finds_a_cycle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from pkg import c\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    assert cycles(import_graph(module_files(pkg))) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
