"""The documentation stays true and self-contained.

- Every dotted Python name under `s3diff_serve.` that README.md or a page in docs/ writes in
  backticks (inline code or a fenced block) must import or resolve, so renaming a function cannot
  leave the docs pointing at something that no longer exists.
- No file of the repository (tracked, or new and not ignored) refers to the developers' design
  notes, which users of the repository do not have: the docs in docs/ state those facts
  themselves.
"""
from __future__ import annotations

import importlib
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("**/*.md")])

FENCE = re.compile(r"^(`{3,}|~{3,})[^\n]*\n.*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"(`+)(.+?)\1", re.DOTALL)
DOTTED = re.compile(r"\bs3diff_serve(?:\.[A-Za-z_]\w*)+")
# `from s3diff_serve.x import a, b` on one line, or `import (a,\n b)` in parentheses.
FROM_IMPORT = re.compile(r"\bfrom[ \t]+(s3diff_serve(?:\.\w+)+)[ \t]+import[ \t]*(?:\(([^)]*)\)|([\w \t,]*))")
# Spelled in pieces so that this file does not match its own check (or a grep for the names).
FORBIDDEN = ("shared" + "/design", "MODEL" + ".md", "SERVICE" + ".md")


def code_spans(text: str) -> list[str]:
    """Fenced code blocks, then the inline code spans of the text around them."""
    fenced = [match.group(0) for match in FENCE.finditer(text)]
    rest = FENCE.sub("", text)
    return fenced + [match.group(2) for match in INLINE.finditer(rest)]


def documented_names(text: str) -> set[str]:
    names: set[str] = set()
    for span in code_spans(text):
        names.update(DOTTED.findall(span))
        for module, parenthesised, plain in FROM_IMPORT.findall(span):
            imported = re.sub(r"\bas\s+\w+", "", parenthesised or plain)
            names.update(f"{module}.{name}" for name in re.findall(r"\w+", imported))
    return names


def resolve(dotted: str) -> object:
    """Import the longest importable module prefix of `dotted`, then getattr the rest."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        module_name = ".".join(parts[:split])
        try:
            target = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name is not None and module_name.startswith(error.name):
                continue  # this prefix is not a module; try a shorter one
            raise  # the module exists but one of its own imports is missing
        for attribute in parts[split:]:
            target = getattr(target, attribute)
        return target
    raise ModuleNotFoundError(dotted)


def all_documented() -> list[tuple[str, str]]:
    pairs = []
    for path in DOC_FILES:
        for name in sorted(documented_names(path.read_text(encoding="utf-8"))):
            pairs.append((str(path.relative_to(ROOT)), name))
    return pairs


def test_the_docs_name_python_objects_at_all():
    """Guards the extraction itself: the model notes name many objects."""
    names = {name for file, name in all_documented() if file == "docs/model.md"}
    assert "s3diff_serve.model.pipeline.S3DiffPipeline.enhance" in names
    assert len(names) > 20


@pytest.mark.parametrize(("doc", "name"), all_documented())
def test_documented_name_resolves(doc, name):
    try:
        resolve(name)
    except (ImportError, AttributeError) as error:
        pytest.fail(f"{doc} names `{name}`, which does not resolve: {type(error).__name__}: {error}")


def test_no_file_refers_to_the_design_notes():
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout
    offenders = []
    for relative in filter(None, listed.decode().split("\0")):
        path = ROOT / relative
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary files
        for number, line in enumerate(text.splitlines(), 1):
            if any(term in line for term in FORBIDDEN):
                offenders.append(f"{relative}:{number}: {line.strip()}")
    assert not offenders, "references to the design notes (state the fact or point at docs/):\n" + "\n".join(offenders)
