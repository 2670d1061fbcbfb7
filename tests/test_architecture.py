"""The import rules of docs/architecture.md, read from the source with `ast`, and the size of functions.

Every import counts: at module level, inside functions, under TYPE_CHECKING, and names taken from the package
root (`from illust2vec import Tagger` is an import of infer, where Tagger lives).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import illust2vec

SRC = Path(illust2vec.__file__).parent
ROOT_EXPORTS = {"Tagger": "infer"}  # names the package root re-exports, and the part each comes from

# The layers, lowest first: a part may import the parts listed for it, and itself.
BASE = {"errors", "util", "formats"}
SHARED = BASE | {"models", "evaluation"}
STAGES = {"booru", "data", "train", "infer", "search", "synth", "evaluate", "export", "convert", "quantize"}
APPS = ("cli", "demo", "report", "distill")
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "util": {"errors"},
    "formats": {"errors", "util"},
    "models": BASE,
    "evaluation": BASE | {"models"},
    **{stage: SHARED for stage in STAGES},
    "serve": SHARED | {"infer", "search"},  # the web front of tagging and search
    # the application: the command line, the demo and its report compose every stage
    # (distill.py: i2v distill, the teacher pass of infer then the student's training)
    **{app: SHARED | STAGES | {"serve", *APPS} for app in APPS},
}


def part_of(module: str) -> str:
    """`illust2vec.infer.tagger` -> `infer`; the part a module belongs to."""
    return module.split(".")[1]


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_parts(path: Path) -> set[tuple[str, int]]:
    """The parts of illust2vec a file imports, each with the line, wherever the import stands."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "illust2vec":  # from illust2vec import Tagger / from .. import errors
                targets += [
                    f"illust2vec.{ROOT_EXPORTS.get(a.name, a.name)}" for a in node.names if a.name != "__version__"
                ]
            else:
                targets.append(target)
        for target in targets:
            if target.startswith("illust2vec."):
                found.add((part_of(target), node.lineno))
    return found


def sources() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if p.name != "__init__.py" or p.parent != SRC)


def violations() -> list[str]:
    bad = []
    for path in sources():
        mine = part_of(module_name(path))
        allowed = ALLOWED.get(mine)
        if allowed is None:
            bad.append(f"{path.relative_to(SRC)}: part {mine!r} is in no layer of docs/architecture.md")
            continue
        for part, line in sorted(imported_parts(path)):
            if part != mine and part not in allowed:
                bad.append(f"{path.relative_to(SRC)}:{line}: {mine} imports {part}")
    return bad


def test_every_import_follows_the_layers():
    assert violations() == []


def test_the_checker_sees_every_kind_of_import(tmp_path, monkeypatch):
    """The rule test itself can fail: a lazy import, one under TYPE_CHECKING and a root re-export are all found."""
    fake = tmp_path / "illust2vec"
    (fake / "search").mkdir(parents=True)
    (fake / "search" / "__init__.py").write_text("")
    (fake / "search" / "bad.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from ..train import loop\n"
        "def f():\n    from ..infer.tagger import Tagger\n"
        "from illust2vec import Tagger as T\n"
        "from ..formats import vectors\n"
    )
    monkeypatch.setattr(__import__(__name__), "SRC", fake)
    assert sorted(imported_parts(fake / "search" / "bad.py")) == [
        ("formats", 7),
        ("infer", 5),
        ("infer", 6),
        ("train", 3),
    ]
    assert sorted(violations()) == [
        "search/bad.py:3: search imports train",
        "search/bad.py:5: search imports infer",
        "search/bad.py:6: search imports infer",
    ]


# Function size: no body much over 80 lines (nested functions count toward the function holding them; the
# signature does not). Only the renderer's drawing code is exempt: a picture is a long list of strokes.
MAX_BODY = 80
EXEMPT = ("synth/draw",)


def long_functions() -> list[str]:
    found = []
    for path in sources():
        rel = str(path.relative_to(SRC))
        if rel.startswith(EXEMPT):
            continue
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
                first = node.body[0]
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and len(node.body) > 1:
                    first = node.body[1]  # the docstring is not code
                body = node.end_lineno - first.lineno + 1
                if body > MAX_BODY:
                    found.append(f"{rel}:{node.lineno} {node.name}: {body} lines")
    return found


def test_no_function_is_much_over_80_lines():
    assert long_functions() == []


@pytest.mark.parametrize("rule", sorted(ALLOWED))
def test_every_part_of_the_package_exists(rule):
    """A part named in the rules that no longer exists means the rules (and docs/architecture.md) are stale."""
    assert (SRC / rule).is_dir() or (SRC / f"{rule}.py").is_file()
