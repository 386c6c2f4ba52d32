"""The house rules of `vitcore/`, checked on its source: files small enough to read in one sitting,
imports that run one way between its rooms, and a core that never names a stage."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

VITCORE = Path(__file__).resolve().parents[1] / "vitcore"
SOURCES = sorted(VITCORE.rglob("*.py"))
STAGE_WORD = re.compile(r"(?<![a-z])(pretrain|finetune|mpp|scratch)(?![a-z])", re.IGNORECASE)


def _room(module: str) -> str:
    """vitcore.train.engine -> "train"; vitcore.config -> "config": a subpackage or a ground module."""
    return module.split(".")[1]


def _imports(path: Path) -> set[str]:
    """The vitcore modules `path` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("vitcore.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vitcore"):
            found |= {node.module if node.module != "vitcore" else f"vitcore.{a.name}" for a in node.names}
    return found


def test_no_file_is_over_400_lines_and_the_trainer_reads_in_one_sitting() -> None:
    long = {str(p.relative_to(VITCORE)): n for p in SOURCES if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"over 400 lines: {long}"
    tree = ast.parse((VITCORE / "train" / "engine.py").read_text())
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    assert trainer.end_lineno - trainer.lineno + 1 <= 250


def test_imports_between_rooms_run_one_way() -> None:
    """No room imports one that imports it, directly or through others."""
    edges: dict[str, set[str]] = {}
    for path in SOURCES:
        module = ".".join(path.relative_to(VITCORE.parent).with_suffix("").parts)
        if module.count(".") < 1:
            continue
        edges.setdefault(_room(module), set()).update(_room(m) for m in _imports(path) if _room(m) != _room(module))

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in edges.get(start, ()))

    cycles = sorted(f"{a} -> {b}" for a, targets in edges.items() for b in targets if reaches(b, a, {b}))
    assert not cycles, f"imports that run both ways: {cycles}"
    assert {"model", "data", "eval", "train", "report"} <= set(edges)


# The rooms from the ground up: a module imports only from its own room and the rooms below it.
# The ground is vitcore's top-level modules (config, checkpoint, rundir, atomic, sharding, ...).
ORDER = ("ground", "model", "data", "eval", "train", "report")


def _level(module: str) -> int:
    room = _room(module)
    return ORDER.index(room) if room in ORDER else 0


def test_each_room_imports_only_from_the_rooms_below_it() -> None:
    upward = sorted(f"{module} imports {m}" for path in SOURCES
                    for module in [".".join(path.relative_to(VITCORE.parent).with_suffix("").parts)]
                    for m in _imports(path) if _level(m) > _level(module))
    assert not upward, "imports against the order " + " < ".join(ORDER) + ":\n" + "\n".join(upward)


def _docstring_lines(tree: ast.Module) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            lines |= set(range(body[0].lineno, body[0].end_lineno + 1))
    return lines


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(VITCORE)))
def test_vitcore_names_no_stage_outside_docstrings_and_comments(path: Path) -> None:
    text = path.read_text()
    docstrings = _docstring_lines(ast.parse(text))
    found = [f"line {tok.start[0]}: {tok.string[:60]}"
             for tok in tokenize.generate_tokens(io.StringIO(text).readline)
             if tok.type in (tokenize.NAME, tokenize.STRING) and tok.start[0] not in docstrings
             and STAGE_WORD.search(tok.string)]
    assert not found, "stage words in vitcore names or strings:\n" + "\n".join(found)


def test_the_stage_word_check_can_fail() -> None:
    assert STAGE_WORD.search('"pretrain/examples"') and STAGE_WORD.search("finetune_train_transform")
    assert STAGE_WORD.search("MPP") and not STAGE_WORD.search("pretrained=True")
