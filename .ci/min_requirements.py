"""Print pip constraints that pin each declared dependency to its lower bound.

Reads ``pyproject.toml`` (the only place the bounds live) and prints one
``name==version`` line for every requirement of the runtime dependencies and
of the extras named on the command line, using each requirement's ``>=``
bound. ``jaxlib`` is pinned beside ``jax`` at the same version. ``make
test-min`` installs the package with these constraints and runs the suite, so
that the oldest versions the package claims to support are the ones tested.

Usage: python .ci/min_requirements.py [EXTRA ...] > constraints.txt
       python .ci/min_requirements.py --check [EXTRA ...]

``--check`` compares the installed versions with the pins instead (and prints
them), failing when any differs or when the interpreter is not the lowest
Python that ``requires-python`` admits.
"""

import platform
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$")


def lower_bound(requirement):
    """The (normalized name, lower bound) of one PEP 508 requirement string."""
    spec = requirement.split(";", 1)[0]
    match = REQUIREMENT.match(spec)
    if match is None:
        raise SystemExit(f"cannot parse requirement {requirement!r}")
    name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
    bounds = [
        s.strip()[2:].strip()
        for s in match.group(3).split(",")
        if s.strip().startswith(">=")
    ]
    if len(bounds) != 1:
        raise SystemExit(
            f"requirement {requirement!r} in pyproject.toml needs exactly one '>=' "
            "lower bound for the minimum-versions test; write it as 'name>=X.Y'"
        )
    return name, bounds[0]


def pins_for(extras):
    """{normalized name: lower bound} for the dependencies and ``extras``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    own_name = project["name"].lower()
    optional = project.get("optional-dependencies", {})
    requirements = list(project.get("dependencies", []))
    for extra in extras:
        if extra not in optional:
            raise SystemExit(
                f"extra {extra!r} is not in pyproject.toml; "
                f"choose from {sorted(optional)}"
            )
        requirements += optional[extra]
    pins = {}
    for requirement in requirements:
        if requirement.lower().startswith(own_name):
            continue  # an extra that names other extras of this package
        name, version = lower_bound(requirement)
        if pins.setdefault(name, version) != version:
            raise SystemExit(
                f"{name} has two lower bounds in pyproject.toml "
                f"({pins[name]} and {version}); make them agree"
            )
    if "jax" in pins:
        pins.setdefault("jaxlib", pins["jax"])
    return pins


def same_version(installed, pinned):
    """Whether ``installed`` is the release ``==pinned`` selects (3.8 == 3.8.0)."""
    a, b = installed.split("."), pinned.split(".")
    width = max(len(a), len(b))
    return a + ["0"] * (width - len(a)) == b + ["0"] * (width - len(b))


def check(pins):
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "requires-python"
    ]
    _, lowest = lower_bound(f"python{requires}")
    print(f"python {platform.python_version()} (requires-python {requires})")
    wrong = []
    if not same_version(".".join(platform.python_version_tuple()[:2]), lowest):
        wrong.append(f"python {platform.python_version()} (lowest is {lowest})")
    for name, version in sorted(pins.items()):
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "(not installed)"
        print(f"{name} {installed}")
        if not same_version(installed, version):
            wrong.append(f"{name} {installed} (pinned {version})")
    if wrong:
        raise SystemExit("not the declared lower bounds: " + ", ".join(wrong))


def main(argv):
    if argv[:1] == ["--check"]:
        check(pins_for(argv[1:]))
    else:
        for name, version in sorted(pins_for(argv).items()):
            print(f"{name}=={version}")


if __name__ == "__main__":
    main(sys.argv[1:])
