"""optaxclip's benchmark suite: a harness, one module per section, a report.

``run.py`` is the entry point (``python benchmarks/run.py --help``);
``report.py`` renders the JSON it writes to Markdown.
"""
