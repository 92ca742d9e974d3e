"""The module graph of agent/: no import cycle (lazy imports inside functions included), and every module
imports on its own in a fresh interpreter, whatever was imported before it."""

from __future__ import annotations

import ast
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / "agent").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        out[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                wanted = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                wanted = [a.name for a in node.names]
            else:
                continue
            deps.update(w for w in wanted if w in mods and w != name and not name.startswith(f"{w}."))
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, deps = work[-1]
            for dep in deps:
                if dep not in index:
                    index[dep] = low[dep] = len(index)
                    stack.append(dep)
                    on_stack.add(dep)
                    work.append((dep, iter(sorted(graph[dep]))))
                    break
                if dep in on_stack:
                    low[node] = min(low[node], index[dep])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_the_cycle_finder_sees_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_in_agent() -> None:
    assert cycles(import_graph()) == []


def test_every_module_imports_in_a_fresh_interpreter_in_random_order() -> None:
    names = [n for n in modules() if not n.endswith("__main__")]  # __main__ runs the CLI
    seed = random.randrange(1 << 30)
    random.Random(seed).shuffle(names)
    # A third-party package this lane does not install (ai_edge_litert for agent.compress on the
    # tflite-runtime lane) is not what this test is about; anything else fails it.
    script = ("import importlib, sys\n"
              "for name in sys.argv[1:]:\n"
              "    try:\n"
              "        importlib.import_module(name)\n"
              "    except ModuleNotFoundError as exc:\n"
              "        if (exc.name or 'agent').split('.')[0] == 'agent':\n"
              "            raise\n")
    proc = subprocess.run([sys.executable, "-c", script, *names], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, f"seed {seed}: {proc.stderr[-2000:]}"


def test_delivery_does_not_reach_the_daemon() -> None:
    """The daemon adapts delivery (agent.ota), not the other way round: nothing delivery imports, directly
    or not, is the daemon, its pipeline, its config or its MQTT connection."""
    graph = import_graph()
    reached: set[str] = set()
    todo = [m for m in graph if m.startswith("agent.delivery")]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(graph[module])
    assert reached.isdisjoint({"agent.daemon", "agent.pipeline", "agent.config", "agent.ota", "agent.mqtt.link"})


def test_no_file_name_twice_in_agent() -> None:
    names = [p.name for p in (ROOT / "agent").rglob("*.py") if p.name != "__init__.py"]
    assert sorted({n for n in names if names.count(n) > 1}) == []


def test_no_module_over_500_lines() -> None:
    """One concern a module: past 500 lines a module is doing two jobs (issue 12's re-cut keeps them apart)."""
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "agent").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}, long
