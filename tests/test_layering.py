"""The package's import graph: no module imports one that (directly or not) imports it back, and the
packages import each other in one direction only (``docs/architecture.md``). Imports inside functions
count: a cycle hidden in a lazy import is still a cycle."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "singularity_ds"

# Each layer may import only the layers before it (and itself).
LAYERS = [
    {"errors", "fileio", "dist", "heartbeat", "hub", "timm_hub", "ds_configs", "paper"},
    {"config"},
    {"data"},
    {"kernels"},
    {"models"},
    {"eval"},
    {"tasks"},
    {"search"},
    {"engine"},
    {"demo", "doctor", "hf_export", "original_export", "gpu_check", "wheelhouse", "reproduce", "launch"},
    {"cli", "__main__"},
]


def modules() -> dict:
    """{"singularity_ds.data.readers.base": path, ...}; a package's ``__init__`` is named after the
    package."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("singularity_ds",) + path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph() -> dict:
    """{module: {modules it imports}} over every import statement, at any depth of the file. ``from
    pkg import name`` counts as importing ``pkg.name`` when that is a module, else ``pkg``; a module's
    own parent packages are not counted (Python imports them for every submodule)."""
    mods = modules()
    graph = {}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        here = name.split(".") if is_pkg else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(here[:len(here) - node.level + 1]
                                    + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for t in targets:
                # `import singularity_ds.data.readers as r`, `from x.y import func`
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name and not name.startswith(t + "."):
                    deps.add(t)
        graph[name] = deps
    return graph


def cycles(graph: dict) -> list:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "singularity_ds"


def test_the_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_lazy_imports():
    graph = import_graph()
    # cli imports its subcommands inside functions only
    assert "singularity_ds.engine.trainer" in graph["singularity_ds.cli"]


def test_no_import_cycle_between_modules():
    assert cycles(import_graph()) == []


def test_no_import_cycle_between_packages():
    graph = import_graph()
    packages = {}
    for mod, deps in graph.items():
        packages.setdefault(top(mod), set()).update(top(d) for d in deps if top(d) != top(mod))
    assert cycles(packages) == []


def test_packages_import_only_earlier_layers():
    layer_of = {name: i for i, names in enumerate(LAYERS) for name in names}
    graph = import_graph()
    assert set(map(top, graph)) - {"singularity_ds"} <= set(layer_of), "a new package needs a layer here"
    wrong = sorted(f"{mod} -> {dep}" for mod, deps in graph.items() for dep in deps
                   if top(mod) in layer_of and top(dep) in layer_of
                   and layer_of[top(dep)] > layer_of[top(mod)])
    assert wrong == []
