"""Docs build helper: render the docstrings' ``Example:`` sections as code.

The docstrings use Google style's singular ``Example:`` heading, which griffe
treats as a plain admonition (so a doctest output such as ``[0.6] [0.8]``
would be read as Markdown links). Renaming it to ``Examples:`` before parsing
makes griffe render the doctests as Python console blocks.
"""

import re

import griffe

_HEADING = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rewrites ``Example:`` headings to ``Examples:`` in every docstring."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _HEADING.sub(r"\1Examples:", obj.docstring.value)
