"""Which of this repository's code a run executed, as digests of its syntax: a study record keeps them, and the
record is stale exactly when one of them changes.

``CodeTrace`` notes every function of the repository that starts running inside its block (a call-only trace:
no line events, so the block runs at nearly full speed). ``code_digests`` turns those into one digest per
function (its syntax tree, docstrings and comments left out, so rewording changes nothing) and one per file for
its module-level statements (constants, class attributes, dataclass fields; imports left out). A function
defined inside another counts as part of the one that defines it. Code a run never executed is not in its
record: adding a flag's handling elsewhere or editing a function the run never calls leaves it current, while
any change to what it ran makes it stale, and ``changed`` names what."""

from __future__ import annotations

import ast
import hashlib
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULE = "<module>"  # the digest of a file's module-level statements


class CodeTrace:
    """Inside the block (which may be entered more than once), the (file, qualified name) of every function under
    ``root``'s ``folders`` that runs. Costs about a fifth more time on the world model's training steps."""

    def __init__(self, root: Path = ROOT, folders: tuple[str, ...] = ("engine", "kernels", "bench")):
        self.prefixes, self.seen = tuple(f"{root}/{folder}/" for folder in folders), set()

    def _trace(self, frame, event, arg):
        code = frame.f_code
        if code.co_filename.startswith(self.prefixes) and code.co_filename != __file__:
            self.seen.add((code.co_filename, code.co_qualname))
        return None  # no line events

    def __enter__(self) -> "CodeTrace":
        self.previous = sys.gettrace()
        sys.settrace(self._trace)
        threading.settrace(self._trace)
        return self

    def __exit__(self, *exc) -> None:
        sys.settrace(self.previous)
        threading.settrace(self.previous)


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return tree


def _digest(node: ast.AST) -> str:
    return hashlib.sha256(ast.dump(node).encode()).hexdigest()[:12]


class _Module:
    """One file's functions by qualified name and its module-level statements, docstrings left out."""

    FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)

    def __init__(self, source: str):
        tree = _without_docstrings(ast.parse(source))
        self.functions: dict[str, ast.AST] = {}
        self._collect(tree.body, "")
        self.module = _digest(ast.Module(body=self._statements(tree.body), type_ignores=[]))

    def _collect(self, body, prefix):
        for node in body:
            for inner in ast.walk(node) if not isinstance(node, (*self.FUNCTIONS, ast.ClassDef)) else [node]:
                if isinstance(inner, self.FUNCTIONS):
                    self.functions.setdefault(prefix + inner.name, inner)
                elif isinstance(inner, ast.ClassDef):
                    self._collect(inner.body, f"{prefix}{inner.name}.")

    def _statements(self, body):
        """``body`` without functions and imports; classes keep only their own statements."""
        kept = []
        for node in body:
            if isinstance(node, (*self.FUNCTIONS, ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.ClassDef):
                node = ast.ClassDef(name=node.name, bases=node.bases, keywords=node.keywords,
                                    body=self._statements(node.body) or [ast.Pass()], decorator_list=node.decorator_list)
            kept.append(node)
        return kept

    def digest(self, name: str) -> str | None:
        if name == MODULE:
            return self.module
        node = self.functions.get(name)
        return None if node is None else _digest(node)


def _definition(qualname: str) -> str:
    """The function whose syntax holds ``qualname``'s code: the outermost named one (a nested function, lambda or
    comprehension belongs to it); class bodies and module code belong to the module-level statements."""
    name = qualname.split(".<locals>.")[0]
    return MODULE if name.startswith("<") else name


def code_digests(seen: set[tuple[str, str]], root: Path = ROOT) -> dict[str, str]:
    """{"file:function": digest} for every traced function and {"file:<module>": digest} for each of their files."""
    modules: dict[str, _Module] = {}
    digests = {}
    for filename, qualname in sorted(seen):
        path = Path(filename)
        relative = path.relative_to(root).as_posix()
        if relative not in modules:
            modules[relative] = _Module(path.read_text())
            digests[f"{relative}:{MODULE}"] = modules[relative].module
        name = _definition(qualname)
        digest = modules[relative].digest(name)
        if name != MODULE and digest is not None:  # class bodies: already in the module-level digest
            digests[f"{relative}:{name}"] = digest
    return digests


def changed(digests: dict[str, str], root: Path = ROOT) -> list[str]:
    """The entries of ``digests`` whose code is no longer what it was (or is gone), as "file:function"."""
    modules: dict[str, _Module | None] = {}
    differ = []
    for entry, digest in digests.items():
        relative, name = entry.rsplit(":", 1)
        if relative not in modules:
            path = root / relative
            modules[relative] = _Module(path.read_text()) if path.exists() else None
        module = modules[relative]
        if module is None or module.digest(name) != digest:
            differ.append(entry)
    return differ
