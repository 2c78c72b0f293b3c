"""What every benchmark writes with its figures: the commit they were measured at, and a section appended
to bench/RESULTS.md."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"


def short_commit() -> str:
    """The checkout's HEAD, abbreviated (empty outside a git checkout)."""
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip()


def append_section(text: str) -> None:
    """Append `text` (a section: its heading, then its figures) to bench/RESULTS.md."""
    with open(RESULTS, "a", encoding="utf-8") as f:
        f.write("\n" + text.lstrip("\n").rstrip("\n") + "\n")


def report(text: str, write: bool) -> None:
    """Print a benchmark's section, and append it to bench/RESULTS.md when asked (`--write`)."""
    print(text)
    if write:
        append_section(text)
