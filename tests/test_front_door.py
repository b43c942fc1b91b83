"""What a new user reads first tells the truth.

The README's install lines install from a clone (the package is on no index
yet) with extras that exist, and name only packages those extras bring; the
API reference has an entry for every public name and ships no build helper.
``make docs-check`` checks the rendered pages themselves in headless Chromium.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import optaxclip
from optaxclip import rules

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

_BASH = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
_PIP = re.compile(
    r"^pip install (?P<editable>-e )?(?P<spec>\S+)\s*#\s*(?P<comment>.*)$", re.M
)


def requirement_names(requirements):
    return {re.match(r"[A-Za-z0-9._-]+", r).group(0).lower() for r in requirements}


def readme_pip_lines():
    text = (ROOT / "README.md").read_text()
    return [m for block in _BASH.findall(text) for m in _PIP.finditer(block)]


def named_packages(comment):
    """The package names a line's comment lists after 'plus' or 'library:'."""
    listed = re.search(r"(?:plus|library:)\s+(.*?)(?:\s+for\s+.*)?$", comment)
    assert listed, f"comment {comment!r} lists no packages"
    return {n.strip().lower() for n in re.split(r",|\band\b", listed.group(1))}


def test_readme_installs_from_a_clone_only():
    text = (ROOT / "README.md").read_text()
    lines = readme_pip_lines()
    assert len(lines) >= 2
    for m in lines:
        assert re.fullmatch(r'\.|"\.\[[a-z,]+\]"', m.group("spec")), m.group(0)
    # No package-index line (`pip install optaxclip...`) until it is published.
    assert not re.search(r"pip install\s+['\"]?optaxclip", text)


def test_readme_extras_install_what_the_readme_says():
    optional = PROJECT["optional-dependencies"]
    runtime = requirement_names(PROJECT["dependencies"])
    seen = set()
    for m in readme_pip_lines():
        extras = re.findall(r"[a-z]+", m.group("spec").partition("[")[2])
        assert set(extras) <= set(optional), m.group(0)
        seen.update(extras)
        installed = set(runtime)
        for extra in extras:
            installed |= requirement_names(optional[extra])
        named = named_packages(m.group("comment"))
        assert named <= installed, f"{m.group(0)!r} names {named - installed}"
    assert {"examples", "test", "docs"} <= seen


def test_readme_make_targets_exist():
    text = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.M))
    named = set(re.findall(r"(?:`|^)make ([a-z][a-z-]*)", text, re.M))
    assert {"demo", "test", "docs", "docs-check"} <= named
    assert named <= targets, named - targets


def api_entries():
    """The names docs/api.md renders: `::: name` lines and rules' members."""
    text = (ROOT / "docs" / "api.md").read_text()
    entries = set(re.findall(r"^::: (\S+)$", text, re.M))
    block = re.search(r"^::: optaxclip\.rules\n(.*?)(?=^\S|\Z)", text, re.M | re.S)
    assert block, "docs/api.md has no `::: optaxclip.rules` entry"
    members = re.findall(r"^\s+- (\w+)$", block.group(1), re.M)
    return entries | {f"optaxclip.rules.{name}" for name in members}


def test_api_reference_lists_every_public_name():
    public = {f"optaxclip.{name}" for name in optaxclip.__all__}
    public |= {f"optaxclip.rules.{name}" for name in rules.__all__}
    missing = public - api_entries()
    assert not missing, f"docs/api.md has no entry for {sorted(missing)}"
    assert "optaxclip.clip" in api_entries()


def test_docs_folder_holds_no_build_helpers():
    # Everything under docs_dir is copied into the built site.
    config = (ROOT / "mkdocs.yml").read_text()
    docs = ROOT / re.search(r"^docs_dir:\s*(\S+)$", config, re.M).group(1)
    assert not sorted(docs.rglob("*.py"))
    extensions = re.findall(r"^\s+- (\S+\.py):\w+$", config, re.M)
    assert extensions, "mkdocs.yml loads no griffe extension"
    for extension in extensions:
        assert (ROOT / extension).is_file(), extension
        assert docs not in (ROOT / extension).parents, extension


def test_api_reference_options_render_sections_and_signatures():
    config = (ROOT / "mkdocs.yml").read_text()
    # A Returns that wraps over lines is one entry, not one per line.
    assert re.search(r"^\s+returns_multiple_items: false$", config, re.M)
    # Signatures stand apart and are formatted (ruff, from the docs extra).
    assert re.search(r"^\s+separate_signature: true$", config, re.M)
    assert re.search(r"^\s+line_length: \d+$", config, re.M)
    assert "ruff" in requirement_names(PROJECT["optional-dependencies"]["docs"])


def test_docstring_sections_start_after_a_blank_line():
    # A section header glued to the previous entry renders as part of it:
    # the API page then shows no "Returns" at all (make docs-check).
    import inspect
    import re

    import optaxclip as oc

    header = re.compile(r"^\s*(Args|Returns|Raises|Example|Examples|References):$")
    glued = []
    for name in oc.__all__:
        doc = inspect.getdoc(getattr(oc, name)) or ""
        lines = doc.splitlines()
        for i, line in enumerate(lines[1:], 1):
            if header.match(line) and lines[i - 1].strip():
                glued.append(f"{name}: {line.strip()}")
    assert not glued, glued
