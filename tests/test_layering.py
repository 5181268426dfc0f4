"""The floors import one way: the core (swr/ and tasks/), then envs/, then policies/, then
the application (swr/app/). A module's floor is derived from its folder, so a new file is
checked without editing this test."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"swr": "swr", "swr.envs": "envs", "swr.policies": "policies", "swr.tasks": "tasks"}

CHECK = """
import swr, swr.methods, swr.tasks, sys
print(sorted(m for m in sys.modules if m.split('.')[0] in {'ray', 'gymnasium', 'stable_baselines3',
      'sb3_contrib'} or m.startswith('swr.policies') or m.startswith('swr.envs')))
print(sorted(m.__file__ for n, m in list(sys.modules.items())
             if n.split('.')[0] == 'swr' and getattr(m, '__file__', None)))
"""


def test_core_imports_no_search_layer_and_no_importlib():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.splitlines()
    assert out[0] == "[]", out[0]
    core_files = eval(out[1])  # noqa: S307 (our own printout)
    assert any(f.endswith("supernet.py") for f in core_files)
    assert any(f.endswith("swr.py") for f in core_files)  # SWR-the-method is core
    plugins = [f for f in core_files if "importlib" in Path(f).read_text()]
    assert plugins == [], plugins


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in PACKAGES.items():
        for f in (ROOT / folder).rglob("*.py"):
            parts = [p for p in f.relative_to(ROOT / folder).with_suffix("").parts
                     if p != "__init__"]
            mods[".".join([pkg, *parts])] = f
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Every module of ours ``name`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def test_no_import_cycle_between_modules():
    mods = _modules()
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}
    assert "swr.app.bench" not in graph["swr.app.tune"]  # tune is handed bench's run_job
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == [], cycles
    # tasks need nothing from the core but its errors, atomic writers and progress bars
    # (leaf modules), so the core may use tasks without a cycle between the two
    for m, deps in graph.items():
        if m.startswith("swr.tasks"):
            core = {d for d in deps if not d.startswith("swr.tasks")}
            assert core <= {"swr.errors", "swr.io", "swr.progress"}, (m, core)
    assert graph["swr.errors"] == set() and graph["swr.io"] <= {"swr.errors"}
    assert graph["swr.progress"] == set()
    # a floor never imports one above it, at the top of a module or inside a function
    wrong = [(m, d) for m, deps in graph.items() for d in deps if floor(d) > floor(m)]
    assert wrong == [], wrong


#: Floors by package (the folder it comes from); every other module is the core (1).
FLOORS = {"swr.envs": 2, "swr.policies": 3, "swr.app": 4}


def floor(module: str) -> int:
    return next((level for pkg, level in FLOORS.items()
                 if module == pkg or module.startswith(pkg + ".")), 1)


def test_every_folder_has_a_floor():
    """The app's folder is the floor above the policies: nothing below imports it."""
    mods = _modules()
    assert {floor(m) for m in mods} == {1, 2, 3, 4}
    assert floor("swr.app.cli") == 4 and floor("swr.app.bench.run") == 4
    assert floor("swr.tasks.registry") == 1 and floor("swr.methods.swr") == 1
