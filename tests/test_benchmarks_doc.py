"""docs/BENCHMARKS.md: every section says which bench/ script prints its figures, and the
commands it gives name scripts and options that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "BENCHMARKS.md"
SCRIPT = re.compile(r"bench/[\w-]+\.(?:py|sh)")
# A command in backticks that runs a bench script, e.g. `python bench/x.py --size 128 --json OUT`.
COMMAND = re.compile(r"`[^`]*?(bench/[\w-]+\.(?:py|sh))([^`]*)`")
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _sections() -> dict[str, str]:
    """Heading -> text of every ``##`` and ``###`` section (a ``###`` one is also in its
    parent's text)."""
    sections: dict[str, list[str]] = {}
    open_ = {}
    for line in DOC.read_text().splitlines():
        level = len(line) - len(line.lstrip("#"))
        if line.startswith("#") and level in (2, 3) and line[level : level + 1] == " ":
            open_ = {k: v for k, v in open_.items() if k < level}
            open_[level] = line[level + 1 :]
            sections[open_[level]] = []
            continue
        for heading in open_.values():
            sections[heading].append(line)
    return {heading: "\n".join(lines) for heading, lines in sections.items()}


SECTIONS = _sections()


def test_the_document_has_sections():
    assert len(SECTIONS) >= 10
    assert "GPU check (issue 18): not run yet" in SECTIONS


@pytest.mark.parametrize("heading", list(SECTIONS))
def test_every_section_names_a_bench_script_that_exists(heading):
    named = set(SCRIPT.findall(SECTIONS[heading]))
    assert named, f"BENCHMARKS.md section {heading!r} names no bench/ script for its figures"
    missing = sorted(path for path in named if not (REPO / path).is_file())
    assert not missing, f"section {heading!r} names bench scripts that do not exist: {missing}"


def test_every_command_gives_options_its_script_has():
    text = DOC.read_text()
    commands = COMMAND.findall(text)
    assert len(commands) >= 15
    unknown = []
    for path, arguments in commands:
        source = (REPO / path).read_text()
        for option in OPTION.findall(arguments):
            if option not in source:
                unknown.append(f"{path} {option}")
    assert not unknown, f"BENCHMARKS.md gives options these scripts do not have: {unknown}"


def test_every_bench_script_is_documented():
    documented = DOC.read_text() + "".join(p.read_text() for p in (REPO / "docs").glob("*.md"))
    scripts = sorted(
        p.relative_to(REPO).as_posix()
        for p in (REPO / "bench").iterdir()
        if p.suffix in (".py", ".sh")
    )
    assert scripts
    undocumented = [s for s in scripts if s not in documented]
    assert not undocumented, f"bench scripts no doc mentions: {undocumented}"
