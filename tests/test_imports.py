"""The layering (server -> streaming -> model -> kernels, integrations beside server) and no
import cycle between the project's modules, read from the source: lazy imports inside
functions count too, since they are what a cycle hides behind."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kernels", "model", "streaming", "server", "integrations")
# What each package may import from the project (itself always).
ALLOWED = {"kernels": set(), "model": {"kernels"}, "streaming": {"model", "kernels"},
           "server": {"streaming", "model", "kernels"}, "integrations": {"streaming", "model", "kernels", "server"}}


def project_imports() -> dict[str, set[str]]:
    """module name -> the project modules it imports (anywhere in the file)."""
    files = {".".join(f.relative_to(ROOT).with_suffix("").parts): f
             for pkg in PACKAGES for f in (ROOT / pkg).rglob("*.py")}
    modules = {name.removesuffix(".__init__") for name in files}
    graph = {}
    for name, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            deps |= {n for n in names if n in modules}
        graph[name.removesuffix(".__init__")] = deps - {name.removesuffix(".__init__")}
    return graph


def test_no_package_imports_upward():
    upward = [(m, d) for m, deps in project_imports().items() for d in deps
              if d.split(".")[0] != m.split(".")[0] and d.split(".")[0] not in ALLOWED[m.split(".")[0]]]
    assert not upward, upward


def test_no_import_cycles():
    graph = project_imports()
    cycles = []

    def visit(node, path, on_path):
        for dep in sorted(graph.get(node, ())):
            if dep == path[0]:
                cycles.append(path)
            elif dep not in on_path and dep > path[0]:   # each cycle once, from its smallest module
                visit(dep, path + [dep], on_path | {dep})

    for module in sorted(graph):
        visit(module, [module], {module})
    assert not cycles, cycles


def test_no_other_installed_distribution_ships_our_package_names():
    """Our top-level packages have plain names. A dependency that installs a module of the
    same name (transformers 5.25 pulls in Hugging Face's `kernels`) shadows ours or is
    shadowed by it, and shares its site-packages folder: fail here, by name, instead of
    with an ImportError deep inside another library."""
    from importlib.metadata import packages_distributions

    owners = packages_distributions()
    clashes = {pkg: sorted(set(owners[pkg]) - {"knotstream"}) for pkg in PACKAGES
               if set(owners.get(pkg, ())) - {"knotstream"}}
    assert not clashes, clashes
