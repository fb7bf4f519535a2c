"""Flags end at cli.py: no other module of the package imports argparse (read from the source with `ast`,
so an import inside a function counts too). Pure Python, no Ray: milliseconds."""

from __future__ import annotations

import ast
from pathlib import Path

import raylstm

PACKAGE = Path(raylstm.__file__).resolve().parent


def _imports_argparse(tree: ast.AST) -> list[int]:
    """Line numbers of every `import argparse` / `from argparse import ...` in a module, at any depth."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "argparse" for a in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "argparse":
            lines.append(node.lineno)
    return sorted(lines)


def test_the_reader_finds_every_form_of_the_import() -> None:
    src = "import os, argparse\ndef f():\n    from argparse import Namespace\nimport argparse as ap\n"
    assert _imports_argparse(ast.parse(src)) == [1, 3, 4]
    assert _imports_argparse(ast.parse("import argparsex\nfrom os import argparse\n")) == []


def test_only_cli_imports_argparse() -> None:
    modules = sorted(PACKAGE.rglob("*.py"))
    assert PACKAGE / "cli.py" in modules and len(modules) > 10
    found = {
        str(p.relative_to(PACKAGE)): lines
        for p in modules
        if (lines := _imports_argparse(ast.parse(p.read_text(), filename=str(p))))
    }
    assert set(found) == {"cli.py"}, f"argparse imported outside cli.py (file: lines): {found}"
