"""The README and docs/ as an entry point: every page is reachable from the README, every relative link resolves,
and every `merv` command a page shows names a real subcommand with real options (its `--help` runs), and every
`make` target exists."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
from pathlib import Path

import pytest

from merv.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# a command in inline code or on a line of a code block: `merv <sub> ...` up to the end of the code span or line
COMMAND = re.compile(r"(?:^|[`\s$(])merv ([a-z][a-z-]*)([^`\n]*)")
OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def code(text: str) -> str:
    """A page's code: the lines of its fenced blocks and its inline code spans, one a line."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S)
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.M | re.S)
    return "\n".join([*blocks, *re.findall(r"`([^`\n]+)`", prose)])


def commands(text: str) -> list[tuple[str, list[str]]]:
    """Every `merv <sub> [options]` a page shows, with the long options written after the subcommand."""
    out = []
    python = re.compile(r"^\s*(from|import) merv", flags=re.M)  # Python in a code block is not a command
    for match in COMMAND.finditer(python.sub("", code(text))):
        rest = match[2].split("#")[0]  # a shell comment after the command is prose
        out.append((match[1], OPTION.findall(rest)))
    return out


def test_every_doc_page_is_linked_from_the_readme():
    readme = (REPO / "README.md").read_text()
    linked = {Path(m).name for m in LINK.findall(readme) if m.startswith("docs/")}
    missing = sorted(p.name for p in PAGES[1:] if p.name not in linked)
    assert not missing, f"docs pages the README does not link: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        if not (page.parent / target).exists():
            broken.append(target)
    assert not broken, f"{page.name}: links to missing files {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_merv_command_shown_parses(page):
    parser = build_parser()
    subs = subparsers(parser)
    problems = []
    for name, options in commands(page.read_text()):
        if name not in subs:
            problems.append(f"`merv {name}`: no such subcommand")
            continue
        known = {s for a in subs[name]._actions for s in a.option_strings} | {
            s for a in parser._actions for s in a.option_strings
        }
        problems += [f"`merv {name} {o}`: no such option" for o in options if o not in known]
    assert not problems, f"{page.name}:\n" + "\n".join(sorted(set(problems)))


def test_the_help_of_every_subcommand_runs():
    """`merv <sub> --help` for every subcommand (what a reader of the docs types first)."""
    parser = build_parser()
    for name in subparsers(parser):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
            parser.parse_args([name, "--help"])
        assert stop.value.code == 0 and f"merv {name}" in out.getvalue(), name


def test_make_targets_shown_exist():
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, flags=re.M))
    shown = set()
    for page in PAGES:
        shown |= set(re.findall(r"^\s*make ([a-z][a-z-]*)", code(page.read_text()), flags=re.M))
    assert shown - targets == set(), f"make targets the docs show that the Makefile lacks: {sorted(shown - targets)}"
