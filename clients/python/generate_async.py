"""Write ragadapt_client/async_client.py from ragadapt_client/client.py: one surface, written once.

    python generate_async.py          # rewrite async_client.py
    python generate_async.py --check  # exit 1 if async_client.py is not what client.py generates

The sync client is the description. Each class becomes its `Async` twin; a method becomes a coroutine (or an
async generator) when it does I/O: it sends a request, sleeps, closes the connection pool, or calls another
method that does. Calls of such methods on `self...` are awaited, `time.sleep` becomes `asyncio.sleep`,
`close` on the HTTP client `aclose`, and the context manager an async one. Everything else, comments and
docstrings included, is copied as it is; ruff then sorts the imports and formats the result, as it does the
rest of the tree. tests/test_generated.py fails when async_client.py and client.py have drifted apart.
"""

from __future__ import annotations

import argparse
import ast
import io
import subprocess
import sys
import tokenize
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent / "ragadapt_client"
SOURCE = PACKAGE / "client.py"
TARGET = PACKAGE / "async_client.py"

# Calls that do I/O in the sync client, and what the async client calls instead.
IO_CALLS = {
    "time.sleep": "asyncio.sleep",
    "self._http.send": "self._http.send",
    "self._http.close": "self._http.aclose",
}
DUNDERS = {"__enter__": "__aenter__", "__exit__": "__aexit__"}
NAMES = {"Iterator": "AsyncIterator", "time": "asyncio"}  # besides the classes, which get the Async prefix
DOCSTRING = (
    '"""The asynchronous client: the surface of ``Client`` (client.py), with ``await`` and ``async for``.\n\n'
    "Generated from client.py by generate_async.py; edit client.py and run ``python generate_async.py``.\n"
    '"""'
)
PHRASES = {  # docstrings that say how the sync client is used
    "Talks to one ragadapt server.": "Talks to one ragadapt server from asyncio code.",
    "Use it as a context manager, or call ``close()``.": (
        "Use it as an async context manager, or await ``close()``."
    ),
}


def _dotted(node: ast.AST) -> str | None:
    """ "self._http.send" for the function of a call `self._http.send(...)`; None unless names all the way."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def _calls(function: ast.FunctionDef) -> list[ast.Call]:
    return [node for node in ast.walk(function) if isinstance(node, ast.Call)]


def _awaited(call: ast.Call, coroutines: set[str]) -> bool:
    """A call of one of the client's coroutines on `self...`, or an I/O call."""
    name = _dotted(call.func)
    if name is None:
        return False
    return name in IO_CALLS or (name.startswith("self.") and name.rsplit(".", 1)[-1] in coroutines)


def _coroutines(classes: list[ast.ClassDef]) -> set[str]:
    """Names of the methods that do I/O, directly or through one another (to a fixed point)."""
    methods = [node for cls in classes for node in cls.body if isinstance(node, ast.FunctionDef)]
    found: set[str] = set()
    while True:
        more = {m.name for m in methods if any(_awaited(call, found) for call in _calls(m))} - found
        if not more:
            return found
        found |= more


class _Edits:
    """Insertions and replacements at (line, byte column) positions of the source, applied last to first."""

    def __init__(self, source: str):
        self.lines = [line.encode() for line in source.splitlines(keepends=True)]
        self.edits: list[tuple[int, int, int, str]] = []  # line, start, end (bytes), replacement

    def insert(self, line: int, column: int, text: str) -> None:
        self.edits.append((line, column, column, text))

    def replace(self, node: ast.AST, text: str) -> None:
        assert node.lineno == node.end_lineno, "replacements stay on one line"
        self.edits.append((node.lineno, node.col_offset, node.end_col_offset, text))

    def apply(self) -> str:
        for line, start, end, text in sorted(self.edits, reverse=True):
            raw = self.lines[line - 1]
            self.lines[line - 1] = raw[:start] + text.encode() + raw[end:]
        return b"".join(self.lines).decode()


def _rename(source: str, names: dict[str, str]) -> str:
    """Rename NAME tokens (never inside strings or comments), and the docstring phrases PHRASES names."""
    lines = source.splitlines(keepends=True)
    found = [
        token
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.NAME and token.string in names
    ]
    for token in reversed(found):  # last first: earlier columns stay where they are
        (row, start), (_, end) = token.start, token.end
        lines[row - 1] = lines[row - 1][:start] + names[token.string] + lines[row - 1][end:]
    text = "".join(lines)
    for phrase, replacement in PHRASES.items():
        text = text.replace(phrase, replacement)
    return text


def _ruff(text: str, *arguments: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "ruff", *arguments, "--stdin-filename", str(TARGET), "-"],
        input=text,
        capture_output=True,
        text=True,
        check=False,
        cwd=TARGET.parent,
    )
    if done.returncode != 0:
        raise RuntimeError(f"ruff {' '.join(arguments)} failed:\n{done.stderr}")
    return done.stdout


def generate(source: str) -> str:
    """The async client's source for the sync client's `source`."""
    tree = ast.parse(source)
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef)]
    coroutines = _coroutines(classes)
    edits = _Edits(source)
    docstring = tree.body[0]
    edits.edits.append((docstring.lineno, docstring.col_offset, len(edits.lines[docstring.lineno - 1]), ""))
    for line in range(docstring.lineno + 1, docstring.end_lineno + 1):
        edits.edits.append((line, 0, len(edits.lines[line - 1]), ""))
    edits.insert(docstring.lineno, 0, DOCSTRING + "\n")
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for cls in classes:
        for method in cls.body:
            if not isinstance(method, ast.FunctionDef):
                continue
            if method.name in coroutines or method.name in DUNDERS:
                edits.insert(method.lineno, method.col_offset, "async ")
            if method.name in DUNDERS:
                line = edits.lines[method.lineno - 1]
                start = line.index(b"def ", method.col_offset) + len(b"def ")
                edits.edits.append((method.lineno, start, start + len(method.name), DUNDERS[method.name]))
            for call in _calls(method):
                if not _awaited(call, coroutines):
                    continue
                name = _dotted(call.func)
                if name in IO_CALLS and IO_CALLS[name] != name:
                    edits.replace(call.func, IO_CALLS[name])
                if isinstance(parents.get(call), (ast.Attribute, ast.Subscript)):  # (await x()).attribute
                    edits.insert(call.lineno, call.col_offset, "(await ")
                    edits.insert(call.end_lineno, call.end_col_offset, ")")
                else:
                    edits.insert(call.lineno, call.col_offset, "await ")
    text = _rename(edits.apply(), {cls.name: f"Async{cls.name}" for cls in classes} | NAMES)
    text = _ruff(text, "check", "--fix", "--select", "I", "--quiet", "--exit-zero")
    return _ruff(text, "format", "--quiet")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if async_client.py is out of date")
    args = parser.parse_args()
    generated = generate(SOURCE.read_text())
    if args.check:
        if TARGET.read_text() != generated:
            print(f"{TARGET} is not what {SOURCE.name} generates; run python {Path(__file__).name}")
            return 1
        return 0
    TARGET.write_text(generated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
