"""Every Python snippet of the README and the docs pages runs.

Each page's ```python blocks run in order in one namespace, under JAX's
standard dtype promotion (what a user gets; the suite itself runs strict),
on the suite's 8 simulated CPU devices. Three conventions, invisible in the
rendered pages:

- `<!-- snippet-setup ... -->` (an HTML comment) holds code run before the
  next block: the names a fragment assumes (`params`, `grads`, ...).
- `<!-- snippet: compile-only -->` before a block marks code for another
  framework (PyTorch, Keras): it is compiled, not run.
- A block with `# -> text` comments must print exactly those lines, in order.
"""

from __future__ import annotations

import contextlib
import io
import re
import textwrap
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_TOKEN = re.compile(
    r"<!--\s*snippet-setup\n(?P<setup>.*?)-->"
    r"|<!--\s*snippet:\s*compile-only\s*-->"
    r"|^(?P<indent>[ \t]*)```python[ \t]*\n(?P<code>.*?)^(?P=indent)```",
    re.S | re.M,
)
_EXPECTED = re.compile(r"#\s*->\s?(.*)$")


def snippets(text):
    """(kind, code, line) for each setup comment and python block of a page."""
    out, compile_only = [], False
    for m in _TOKEN.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        if m.group("setup") is not None:
            out.append(("setup", m.group("setup"), line))
        elif m.group("code") is None:
            compile_only = True
        else:
            code = textwrap.dedent(m.group("code"))
            out.append(("compile" if compile_only else "run", code, line))
            compile_only = False
    return out


def expected_output(code):
    return [m.group(1).strip() for m in map(_EXPECTED.search, code.splitlines()) if m]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_page_snippets_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snippets may write files (plots)
    blocks = snippets(page.read_text())
    namespace = {"__name__": f"snippets_{page.stem}"}
    for kind, code, line in blocks:
        where = f"{page.relative_to(ROOT)}:{line}"
        compiled = compile(code, where, "exec")
        if kind == "compile":
            continue
        stdout = io.StringIO()
        with jax.numpy_dtype_promotion("standard"), contextlib.redirect_stdout(stdout):
            exec(compiled, namespace)
        expected = expected_output(code)
        if expected:
            printed = [ln.strip() for ln in stdout.getvalue().splitlines()]
            assert printed == expected, f"{where} printed {printed}, not {expected}"


def test_every_page_with_python_is_collected():
    # The parser finds the blocks (including indented ones in list items),
    # so a page cannot silently pass by having none recognised.
    found = {p.name: len(snippets(p.read_text())) for p in PAGES}
    for page in PAGES:
        if "```python" in page.read_text():
            assert found[page.name] > 0, page


def test_parser_conventions():
    text = (
        "<!-- snippet-setup\nx = 1\n-->\n"
        "```python\nprint(x)  # -> 1\n```\n"
        "<!-- snippet: compile-only -->\n```python\nimport torch\n```\n"
        "- item\n\n  ```python\n  y = 2\n  ```\n"
    )
    kinds = [(k, c) for k, c, _ in snippets(text)]
    assert kinds == [
        ("setup", "x = 1\n"),
        ("run", "print(x)  # -> 1\n"),
        ("compile", "import torch\n"),
        ("run", "y = 2\n"),
    ]
    assert expected_output("print(x)  # -> 1\nz = 3  # not output\n") == ["1"]
