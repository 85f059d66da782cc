"""The package's import graph has no cycles, counting imports inside functions too: a module that needs
another lazily to break a circle is a seam in the wrong place (DEVELOPERS.md, the map)."""
import ast
import os

from helpers import ROOT

PACKAGE = os.path.join(ROOT, "autoregembed")


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its file."""
    paths = {}
    for folder, _, files in os.walk(PACKAGE, followlinks=False):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
                paths[rel.removesuffix(".__init__")] = os.path.join(folder, f)
    graph = {m: set() for m in paths}
    for mod, path in paths.items():
        package = mod.split(".") if path.endswith("__init__.py") else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                    if node.level else node.module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[mod] |= {t for t in targets if t in paths and t != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_finder_sees_a_cycle_through_a_lazy_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_package_has_no_import_cycles():
    graph = import_graph()
    assert "autoregembed.method.logprobs" in graph and graph["autoregembed.method.losses"]  # it read the package
    assert cycles(graph) == []


FLOORS = ("ground", "method", "release", "run", "tools")  # each may import only its own floor and those before it


def test_no_floor_imports_one_above_it():
    """ground < method < release < run < tools (DEVELOPERS.md): the method never reaches for the run, the
    run stands on the release, the command line on everything; kernels/ and ds_configs/ sit with ground."""
    graph = import_graph()
    floor = {m: (FLOORS.index(m.split(".")[1]) if m.split(".")[1] in FLOORS else 0) for m in graph if m.count(".") >= 1}
    assert {m.split(".")[1] for m in floor} >= set(FLOORS)
    upward = sorted((a, b) for a, targets in graph.items() if a in floor for b in targets if floor.get(b, 0) > floor[a])
    assert upward == []


def whole_config_readers() -> list[str]:
    """Functions with a parameter annotated ``Config`` (or an unannotated ``cfg``): module.qualname."""
    out = []
    for folder, _, files in os.walk(PACKAGE):
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            path = os.path.join(folder, f)
            mod = os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")
            tree = ast.parse(open(path).read())
            for cls in [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef))]:
                prefix = "" if cls is tree else f"{cls.name}."
                for fn in (n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
                    args = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
                    if any((a.annotation is not None and ast.unparse(a.annotation).strip("'\"") == "Config")
                           or (a.arg == "cfg" and a.annotation is None) for a in args):
                        out.append(f"{mod}.{prefix}{fn.name}")
    return sorted(out)


def test_few_functions_read_the_whole_config():
    """Stages are bound to their sections (``stages.stages_for``) and the machinery to its context
    (``session.RunContext.of``): the whole Config is read where a run is composed, nowhere else
    (DEVELOPERS.md, newcomer counts; 89 such functions before the stages took their sections)."""
    assert whole_config_readers() == ["run.config._expand_paths", "run.config.check_runtime", "run.pipeline.run",
                                      "run.session.RunContext.of", "run.stages.stages_for"]
