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


# Library modules that once took the parsed flags themselves (`run_sample_cli(args)`, `run_server(args,
# cfg)`, `run_evaluate_cli(args)`): their functions take typed values now. One exception is Ray Serve's
# own contract: an application builder receives the `serve run module:builder key=value` pairs as a dict.
TYPED_MODULES = ("sample.py", "serve.py", "evaluate.py")


def _namespace_parameters(tree: ast.AST) -> list[str]:
    """`function(parameter)` for every parameter named `args` or annotated as an argparse Namespace,
    except one annotated as a dict (Serve's application-builder argument)."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        a = node.args
        for p in [*a.posonlyargs, *a.args, *a.kwonlyargs]:
            note = ast.unparse(p.annotation) if p.annotation is not None else ""
            if (p.arg == "args" and not note.lower().startswith("dict")) or "Namespace" in note:
                found.append(f"{getattr(node, 'name', 'lambda')}({p.arg}: {note or '?'})")
    return found


def test_the_parameter_reader_finds_namespace_glue() -> None:
    src = (
        "def run_cli(args): ...\n"
        "def run_server(args: Any, cfg): ...\n"
        "class S:\n    def go(self, ns: argparse.Namespace): ...\n"
        "def app_builder(args: dict[str, str]): ...\n"
        "def fine(*args, **kwargs): ...\n"
    )
    assert _namespace_parameters(ast.parse(src)) == [
        "run_cli(args: ?)",
        "run_server(args: Any)",
        "go(ns: argparse.Namespace)",
    ]


def test_sample_serve_and_evaluate_take_no_parsed_flags() -> None:
    found = {
        name: params
        for name in TYPED_MODULES
        if (params := _namespace_parameters(ast.parse((PACKAGE / name).read_text(), filename=name)))
    }
    assert found == {}, f"functions that take the parsed command line (module: functions): {found}"
