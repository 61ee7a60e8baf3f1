"""Every code block of README.md runs as written, and its headline table is a committed measurement.

Blocks fenced as ``python`` run with the Python that runs the tests; ``bash``/``sh``/``shell`` blocks run
with ``bash -eo pipefail``; other languages (``text``, ``toml``, ...) are shown, not run, and a block
without a language is an error (it would silently escape this test). The two set-up commands, marked
``<!-- setup-command -->`` and ``<!-- test-command -->`` on the line above their block, are run by
``.ci/run`` itself and are skipped here (the test command would run this test again).

Each block runs in a fresh subprocess, in a fresh temporary directory whose top level mirrors the
checkout through symlinks: paths such as ``benchmarks/`` resolve as they do for a reader standing in
the clone, while files a block writes at the top level stay out of the tree.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"
MARKERS = {"<!-- setup-command -->": "setup-command", "<!-- test-command -->": "test-command"}
SHELLS = ("bash", "sh", "shell")
TIMEOUT_S = 600

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<language>[^\s`]*)")


@dataclass(frozen=True)
class Block:
    language: str
    code: str
    line: int
    marker: str | None

    @property
    def runs_here(self) -> bool:
        return self.marker is None and (self.language == "python" or self.language in SHELLS)


def _without_fence_indent(line: str, indent: int) -> str:
    """A code line of a fence indented by ``indent`` spaces, less up to that many leading spaces (CommonMark):
    the code's own indentation stays."""
    return line[min(indent, len(line) - len(line.lstrip(" "))):]


def parse_blocks(text: str) -> list[Block]:
    """Fenced code blocks of a markdown text, each with the marker comment above it (blank lines allowed)."""
    lines = text.splitlines()
    blocks, marker, i = [], None, 0
    while i < len(lines):
        stripped = lines[i].strip()
        opening = _FENCE.match(lines[i])
        if opening:
            fence, indent, start = opening["fence"], len(opening["indent"]), i + 1
            body = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(fence):
                body.append(_without_fence_indent(lines[i], indent))
                i += 1
            blocks.append(Block(opening["language"].lower(), "\n".join(body) + "\n", start, marker))
            marker = None
        elif stripped in MARKERS:
            marker = MARKERS[stripped]
        elif stripped:
            marker = None
        i += 1
    return blocks


def headline_table(text: str) -> list[str]:
    """The lines of the first markdown table outside code blocks (header, separator, rows)."""
    in_code, table = None, []
    for line in text.splitlines():
        opening = _FENCE.match(line)
        if opening and in_code is None:
            in_code = opening["fence"]
        elif in_code is not None and line.strip().startswith(in_code):
            in_code = None
        elif in_code is None and line.lstrip().startswith("|"):
            table.append(line.strip())
        elif table:
            break
    return table


BLOCKS = parse_blocks(README.read_text()) if README.is_file() else []


def _sandbox(tmp_path: Path) -> Path:
    for entry in ROOT.iterdir():
        if entry.name != ".git":
            (tmp_path / entry.name).symlink_to(entry)
    return tmp_path


def test_readme_has_code_blocks_with_languages_and_setup_markers():
    assert README.is_file(), "README.md is missing"
    assert BLOCKS, "README.md has no code blocks"
    unlabeled = [block.line for block in BLOCKS if not block.language]
    assert not unlabeled, f"README.md: code blocks without a language at lines {unlabeled}"
    for marker in MARKERS.values():
        marked = [block for block in BLOCKS if block.marker == marker]
        assert len(marked) == 1, f"README.md needs exactly one block under <!-- {marker} -->"
        assert marked[0].language in SHELLS, f"the {marker} block must be a shell block"
        # .ci/run runs the first line of each marked block: a second line would be silently dropped there
        assert len(marked[0].code.strip().splitlines()) == 1, f"the {marker} block must be one line"


@pytest.mark.parametrize(
    "block",
    [block for block in BLOCKS if block.runs_here],
    ids=lambda block: f"{block.language}-line{block.line}",
)
def test_readme_block_runs(block: Block, tmp_path: Path):
    cwd = _sandbox(tmp_path)
    script = tmp_path / f"readme_block_{block.line}.{'py' if block.language == 'python' else 'sh'}"
    script.write_text(block.code)
    command = [sys.executable, str(script)] if block.language == "python" else ["bash", "-eo", "pipefail", str(script)]
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, (
        f"README.md line {block.line} ({block.language}) exited {proc.returncode}\n"
        f"--- code ---\n{block.code}--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
    )


def test_headline_table_is_copied_from_a_results_file():
    assert README.is_file(), "README.md is missing"
    table = headline_table(README.read_text())
    assert len(table) >= 3, "README.md has no headline table (header, separator and at least one row)"
    rows = "\n".join(table[2:])
    sources = [path for path in sorted(RESULTS.rglob("*")) if path.is_file() and rows in path.read_text()]
    assert sources, f"the README's headline table rows are not copied verbatim from any file in {RESULTS}"
    for path in sources:
        assert re.search(r"command: `fastprompt bench[^`]*`", path.read_text()), (
            f"{path} does not name the fastprompt bench command that produced it"
        )


def test_parser_sees_markers_fences_and_tables():
    text = (
        "intro\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n<!-- setup-command -->\n\n```bash\npip install -e .\n```\n"
        "text\n<!-- test-command -->\nnot a block\n```sh\npytest\n```\n  ~~~python\n  print(1)\n  ~~~\n"
        "```\nplain\n```\n```python\nif True:\n    x = 1\n\n        y = 2\n```\n"
        "  ```python\n  for i in ():\n      pass\n short\n  ```\n"
    )
    blocks = parse_blocks(text)
    assert [(b.language, b.code, b.marker) for b in blocks] == [
        ("bash", "pip install -e .\n", "setup-command"),
        ("sh", "pytest\n", None),
        ("python", "print(1)\n", None),
        ("", "plain\n", None),
        ("python", "if True:\n    x = 1\n\n        y = 2\n", None),  # a fence at column 0 keeps all indentation
        ("python", "for i in ():\n    pass\nshort\n", None),  # an indented fence loses at most its own indent
    ]
    assert [b.runs_here for b in blocks] == [False, True, True, False, True, True]
    assert headline_table(text) == ["| a | b |", "|---|---|", "| 1 | 2 |"]
    assert headline_table("```text\n| not | a table |\n```\n| x |\n|---|\n| 3 |\n") == ["| x |", "|---|", "| 3 |"]
