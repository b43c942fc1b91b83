"""Open the built API reference in headless Chromium and check what it shows.

``make docs-check`` runs this after ``make docs``. It drives Chromium through
``chromedriver`` (the W3C WebDriver protocol, spoken with the standard
library), loads ``site/api/index.html`` in a 1280 px wide window and reads the
rendered page. It fails, naming each problem, unless:

- every name in ``optaxclip.__all__`` and ``optaxclip.rules.__all__`` has an
  entry (a heading with the id ``optaxclip.<name>``);
- the Args, Raises and Returns sections of each public docstring render as
  many entries as the docstring holds (a Returns that wraps over several lines
  is one entry, whose text is the whole of it);
- every signature fits the page (nothing hidden past its right edge) and one
  longer than the configured ``line_length`` is formatted over several lines;
- the built site holds no Python file (build helpers such as the griffe
  extension stay out of it).

Usage: python .ci/docs_check.py [SITE_DIR] [--screenshot PNG [--at ID]]

``--screenshot`` saves what the window shows with the entry ``--at`` (default
``optaxclip.skip_spikes``) at its top, to look at the page by eye.
"""

import argparse
import base64
import inspect
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WINDOW = (1280, 1000)

# Runs in the page; returns what the checks need from the rendered DOM.
READ_PAGE = """
const text = (el) => el.textContent.replace(/\\s+/g, " ").trim();
const out = {};
for (const heading of document.querySelectorAll(".doc-heading[id]")) {
  const obj = heading.closest(".doc-object");
  if (obj === null) continue;
  const entry = {sections: {}, signature: null};
  const code = obj.querySelector(":scope > .doc-signature code");
  if (code !== null) {
    const pre = code.closest("pre");
    entry.signature = {
      text: code.textContent,
      hidden: Math.max(code.scrollWidth - code.clientWidth,
                       pre.scrollWidth - pre.clientWidth),
      right: pre.getBoundingClientRect().right,
      page: document.documentElement.clientWidth,
    };
  }
  for (const title of obj.querySelectorAll(".doc-section-title")) {
    if (title.closest(".doc-object") !== obj) continue;
    const table = title.closest("p").nextElementSibling;
    const rows = table === null ? [] :
      [...table.querySelectorAll("tbody > tr.doc-section-item")];
    entry.sections[text(title).replace(/:$/, "")] = rows.map((row) => {
      const description = row.querySelector(".doc-md-description");
      return text(description === null ? row : description);
    });
  }
  out[heading.id] = entry;
}
return out;
"""

# Google-style section headings as written in the docstrings, and the titles
# the rendered page gives them.
SECTIONS = {"Args": "Parameters", "Raises": "Raises", "Returns": "Returns"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("site", nargs="?", default=str(ROOT / "site"))
    parser.add_argument("--screenshot", help="save a PNG of the page here")
    parser.add_argument("--at", default="optaxclip.skip_spikes")
    args = parser.parse_args()

    site = Path(args.site).resolve()
    page = site / "api" / "index.html"
    if not page.is_file():
        sys.exit(f"{page} does not exist; build the site first with `make docs`")
    sys.path.insert(0, str(ROOT))
    import optaxclip
    from optaxclip import rules

    public = {
        f"optaxclip.{name}": getattr(optaxclip, name) for name in optaxclip.__all__
    }
    public.update(
        {f"optaxclip.rules.{name}": getattr(rules, name) for name in rules.__all__}
    )
    with Browser() as browser:
        browser.open(page.as_uri())
        entries = browser.run(READ_PAGE)
        if args.screenshot:
            browser.run(
                "document.getElementById(arguments[0]).scrollIntoView(true);"
                # below the header bar, which stays at the top
                "window.scrollBy(0, -64);",
                args.at,
            )
            Path(args.screenshot).write_bytes(browser.screenshot())

    problems = check_entries(public, entries)
    problems += check_sections(public, entries)
    problems += check_signatures(entries, line_length())
    problems += check_site_files(site)
    for problem in problems:
        print(f"docs-check: {problem}", file=sys.stderr)
    if problems:
        sys.exit(f"docs-check: {len(problems)} problems in {page}")
    signatures = sum(entry["signature"] is not None for entry in entries.values())
    print(
        f"docs-check: {len(public)} public names, {signatures} signatures and "
        f"their sections render as written in {page}"
    )


def check_entries(public, entries):
    """A problem for each public name without an entry on the page."""
    return [
        f"{name} has no entry; add `::: {name}` to docs/api.md"
        for name in public
        if name not in entries
    ]


def check_sections(public, entries):
    """Problems where a rendered section differs from its docstring."""
    problems = []
    for name, obj in public.items():
        if name not in entries or not documented_here(name, obj):
            continue
        canonical = name.rsplit(".", 1)[0] + "." + obj.__name__
        if canonical != name:
            signature = entries[name]["signature"] or {"text": ""}
            if obj.__name__ not in signature["text"]:
                problems.append(f"{name} is {canonical}, but its entry does not say so")
            continue
        written = docstring_sections(inspect.cleandoc(obj.__doc__))
        rendered = entries[name]["sections"]
        for heading, items in written.items():
            title = SECTIONS[heading]
            shown = rendered.get(title, [])
            if len(shown) != len(items):
                problems.append(
                    f"{name}: its {heading} section holds {count(items)} but "
                    f"the page shows {count(shown)} under {title!r}: {shown}"
                )
            elif heading == "Returns" and plain(items[0]) != shown[0]:
                problems.append(
                    f"{name}: Returns reads {shown[0]!r} on the page, but "
                    f"{plain(items[0])!r} in the docstring"
                )
    return problems


def check_signatures(entries, length):
    """Problems with signatures cut off at the page edge or left unformatted."""
    problems = []
    for name, entry in entries.items():
        signature = entry["signature"]
        if signature is None:
            continue
        lines = signature["text"].rstrip("\n").split("\n")
        if signature["hidden"] > 0 or signature["right"] > signature["page"]:
            problems.append(
                f"{name}: {signature['hidden']} px of its signature are hidden "
                "past the right edge of its box"
            )
        one_line = " ".join(line.strip() for line in lines)
        if len(lines) == 1 and len(one_line) > length:
            problems.append(
                f"{name}: its signature is one line of {len(one_line)} characters "
                f"(line_length is {length}); install the docs extra (ruff "
                "formats signatures) and keep separate_signature: true"
            )
    multi = [
        e
        for e in entries.values()
        if e["signature"] and "\n" in e["signature"]["text"].strip()
    ]
    if not multi:
        problems.append("no signature is formatted over several lines")
    return problems


def check_site_files(site):
    """A problem for each Python file (a build helper) copied into the site."""
    return [
        f"{path.relative_to(site)} is in the built site; move build helpers out "
        "of docs/ or list them under exclude_docs in mkdocs.yml"
        for path in sorted(site.rglob("*.py"))
    ]


def documented_here(name, obj):
    """Whether ``obj`` is a function or class with a docstring of this package."""
    return (
        (inspect.isfunction(obj) or inspect.isclass(obj))
        and obj.__module__.startswith("optaxclip")
        and isinstance(obj.__doc__, str)
    )


def docstring_sections(doc):
    """{heading: [item text, ...]} for the Args, Raises and Returns sections.

    An item starts on a line at the section's first indentation; deeper lines
    continue it. Returns always holds one item, however many lines it wraps.
    """
    sections = {}
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        heading = line.strip().rstrip(":")
        if line.strip() != heading + ":" or heading not in SECTIONS:
            continue
        body = []
        for following in lines[i + 1 :]:
            if following.strip() and indent(following) <= indent(line):
                break
            body.append(following)
        while body and not body[-1].strip():
            body.pop()
        body = [b for b in body if b.strip()]
        if not body:
            continue
        if heading == "Returns":
            sections[heading] = [" ".join(b.strip() for b in body)]
            continue
        base = indent(body[0])
        items = []
        for b in body:
            if indent(b) == base:
                items.append(b.strip())
            else:
                items[-1] += " " + b.strip()
        sections[heading] = items
    return sections


def count(items):
    return f"{len(items)} entr{'y' if len(items) == 1 else 'ies'}"


def indent(line):
    return len(line) - len(line.lstrip())


def plain(markdown):
    """The text a Markdown fragment of a docstring shows once rendered."""
    text = re.sub(r"\[([^\]]+)\]\[[^\]]*\]", r"\1", markdown)
    text = text.replace("``", "").replace("`", "")
    text = re.sub(r"\*\*(.+?)\*\*|\*(.+?)\*", lambda m: m.group(1) or m.group(2), text)
    return re.sub(r"\s+", " ", text).strip()


def line_length():
    """The signature ``line_length`` configured in mkdocs.yml."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    for plugin in config["plugins"]:
        if isinstance(plugin, dict) and "mkdocstrings" in plugin:
            options = plugin["mkdocstrings"]["handlers"]["python"]["options"]
            return options.get("line_length", 60)
    sys.exit("mkdocs.yml configures no mkdocstrings plugin")


class Browser:
    """Headless Chromium driven through chromedriver's WebDriver endpoint."""

    def __enter__(self):
        chromium = find_program("chromium", "chromium-browser", "google-chrome")
        driver = find_program("chromedriver")
        self.profile = tempfile.mkdtemp(prefix="docs-check-")
        port = free_port()
        self.driver = subprocess.Popen(
            [driver, f"--port={port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"http://127.0.0.1:{port}"
        self.session = None
        try:
            self._wait_ready()
            options = {
                "binary": chromium,
                "args": [
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--hide-scrollbars",
                    f"--user-data-dir={self.profile}",
                    f"--window-size={WINDOW[0]},{WINDOW[1]}",
                ],
            }
            capabilities = {"alwaysMatch": {"goog:chromeOptions": options}}
            reply = self._call("POST", "/session", {"capabilities": capabilities})
            self.session = f"/session/{reply['sessionId']}"
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        if self.session is not None:
            try:
                self._call("DELETE", self.session)
            except (OSError, RuntimeError):
                pass
        self.driver.terminate()
        try:
            self.driver.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.driver.kill()
            self.driver.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def open(self, url):
        self._call("POST", f"{self.session}/url", {"url": url})
        self.run("return document.fonts.ready.then(() => true);")

    def run(self, script, *args):
        body = {"script": script, "args": list(args)}
        return self._call("POST", f"{self.session}/execute/sync", body)

    def screenshot(self):
        return base64.b64decode(self._call("GET", f"{self.session}/screenshot"))

    def _wait_ready(self, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.driver.poll() is not None:
                sys.exit(f"chromedriver exited with code {self.driver.returncode}")
            try:
                if self._call("GET", "/status").get("ready"):
                    return
            except (OSError, RuntimeError):
                pass
            time.sleep(0.2)
        sys.exit(f"chromedriver did not answer on {self.url} within {timeout} s")

    def _call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return json.load(response)["value"]
        except urllib.error.HTTPError as error:
            value = json.load(error).get("value", {})
            raise RuntimeError(
                f"WebDriver {method} {path}: {value.get('message', error)}"
            ) from None


def find_program(*names):
    for name in names:
        path = shutil.which(name)
        if path is not None:
            return path
    sys.exit(
        f"none of {', '.join(names)} is on PATH; install Chromium and its "
        "driver (Debian: apt-get install -y chromium chromium-driver), or run "
        "`make docs-check`, which does"
    )


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    main()
