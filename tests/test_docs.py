"""README and docs/ cannot drift from the code: their relative links resolve, the `make` targets and
`--options` they name exist, and every section quoting a measured figure says where it came from."""

import ast
import re
from pathlib import Path

import pytest

from pipeline.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Flags of other tools the pages show (pip, pytest, ray, chromium, mkdocs); anything else must be ours.
FOREIGN = {
    "--address",
    "--head",
    "--headless",
    "--no-sandbox",
    "--no-deps",
    "--port",
    "--screenshot",
    "--strict",
    "--window-size",
}
FIGURE = re.compile(r"\b0\.\d{3,4}\b|\d img/s|\d+ min \d+ s\b|\d+(\.\d+)?× (cheaper|faster)|\b\d[\d,.]* (s|MB|GB)\b")
MARKER = re.compile(r"<!-- measured: (.*?) -->")


def _text(page: Path) -> str:
    return re.sub(r"<!--(?! measured:).*?-->", "", page.read_text(), flags=re.S)


def _sections(text: str) -> list[str]:
    """A page cut at its headings, code blocks kept whole (a `#` comment in bash is not a heading)."""
    out, current, fenced = [], [], False
    for line in text.splitlines():
        fenced ^= line.startswith("```")
        if line.startswith("#") and not fenced and current:
            out.append("\n".join(current))
            current = []
        current.append(line)
    return out + ["\n".join(current)]


def _cli_options() -> set[str]:
    """Every long option of `python -m pipeline` and its subcommands (``--x`` and, for flags, ``--no-x``)."""
    found, parsers = set(), [build_parser()]
    while parsers:
        for action in parsers.pop()._actions:
            longs = [s for s in action.option_strings if s.startswith("--")]
            found.update(longs + [f"--no-{s[2:]}" for s in longs])
            if isinstance(action.choices, dict):  # the subcommands
                parsers.extend(action.choices.values())
    return found


def _script_options() -> set[str]:
    """Options of the benchmark and example scripts, read from their add_argument calls."""
    found = set()
    for script in [*REPO.glob("benchmarks/*.py"), *REPO.glob("examples/*.py")]:
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
                found.update(
                    a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")
                )
    return found


def _make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][a-z-]*):", (REPO / "Makefile").read_text(), flags=re.M))


def broken_links(page: Path) -> list[str]:
    links = re.findall(r"\]\(([^)\s]+)\)", _text(page))
    return [
        link
        for link in links
        if not re.match(r"[a-z]+://|#|mailto:", link) and not (page.parent / link.split("#")[0]).exists()
    ]


def _code(text: str) -> str:
    """What the pages show as code (fenced blocks and `spans`): the commands and options a reader copies."""
    blocks = re.findall(r"^```.*?^```", text, flags=re.M | re.S)
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", text, flags=re.M | re.S))
    return "\n".join(blocks + spans)


def unknown_names(page: Path) -> list[str]:
    """`make` targets the Makefile lacks and `--options` no command or script of ours has."""
    code = _code(_text(page))
    named = set()
    for words in re.findall(r"\bmake((?: [a-z][a-z-]*)+)", code):
        named.update(words.split())
    options = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", code))
    return sorted((named - _make_targets()) | (options - _cli_options() - _script_options() - FOREIGN))


def unsourced(page: Path) -> list[str]:
    """Headings of sections that quote a measured figure without a complete ``measured`` marker."""
    out = []
    for section in _sections(_text(page)):
        markers = [dict(kv.split("=", 1) for kv in m.split("; ") if "=" in kv) for m in MARKER.findall(section)]
        if FIGURE.search(section) and not any(
            re.fullmatch(r"\d{4}-\d{2}-\d{2}", m.get("date", "")) and m.get("machine") and m.get("command")
            for m in markers
        ):
            out.append(section.splitlines()[0])
    return out


@pytest.mark.parametrize("check", [broken_links, unknown_names, unsourced])
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_the_pages_agree_with_the_code(page, check):
    assert check(page) == []


def test_each_check_catches_a_planted_drift(tmp_path):
    page = tmp_path / "planted.md"
    page.write_text(
        "# A\n\nRuns at 123 img/s. See [x](missing.md). `make svm nosuchtarget ARGS=--no-such-option`\n\n"
        "# B\n\n<!-- measured: date=2026-12-04; machine=2-core CPU -->\n0.9060 test accuracy.\n"
    )
    assert broken_links(page) == ["missing.md"]
    assert unknown_names(page) == ["--no-such-option", "nosuchtarget"]
    assert unsourced(page) == ["# A", "# B"]  # B's marker names no command
