"""The engine's layout holds: imports go one way (no cycle, no layer importing a higher one, imports inside
functions counted), every file says its job, and no room grows past its size (README.md, "Layout")."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Bottom to top; a module may import its own layer and the layers below it. The longest matching prefix decides.
LAYERS = [
    ("kernels",),
    ("engine.errors", "engine.assets", "engine.runtime", "engine.distributed", "engine.context_parallel", "engine.media",
     "engine.tracking", "engine.stats",
     "engine.memory.tree"),  # a torch-only helper in the memory package, shared with the causal decode (models)
    ("engine.schedule",),
    ("engine.models",),
    ("engine.lora", "engine.acceleration"),
    ("engine.memory", "engine.counting"),
    ("engine.chain",),
    ("engine.rewards",),
    ("engine.video_reward", "engine.regularize"),
    ("engine.world",),
    ("engine.data",),
    ("engine.builtin",),
    ("engine.config", "engine.cli"),
    ("engine.train", "engine.sample", "engine.evaluate", "engine.export", "engine.world.build", "engine.world.reward_stages",
     "engine.world.training", "engine.world.motion_reward", "engine.world.motion_stages"),
    ("engine",),  # engine/__init__.py: the public names, imported lazily by name
]
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 80


def modules() -> dict[str, Path]:
    """Module name -> file, for engine/ and kernels/."""
    found = {}
    for package in ("engine", "kernels"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The engine/kernels modules ``name`` imports anywhere in its file (top level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # "engine.models.base.VideoDiffusion" -> "engine.models.base"
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def layer(name: str) -> int:
    best, index = "", None
    for i, group in enumerate(LAYERS):
        for prefix in group:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > len(best):
                best, index = prefix, i
    assert index is not None, f"{name} is in no layer of tests/test_layout.py: add it"
    return index


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (the first repeated at the end), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_names_the_modules_of_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_in_the_engine():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_go_down_the_layers_only():
    upward = [f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)})"
              for name, targets in graph().items() for target in sorted(targets) if layer(target) > layer(name)]
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("name, path", sorted(modules().items()))
def test_each_file_says_its_job_and_stays_small(name, path):
    tree = ast.parse(path.read_text())
    assert ast.get_docstring(tree), f"{path.relative_to(ROOT)} has no module docstring saying its job"
    if name.startswith("engine"):
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_FILE_LINES, f"{path.relative_to(ROOT)} has {lines} lines (at most {MAX_FILE_LINES})"
        long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(tree)
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
        assert not long, f"{path.relative_to(ROOT)}: functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"
