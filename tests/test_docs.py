"""The documents point only at what is there: relative links in the Markdown files resolve to
files of the repository (and to headings that exist), and every "DESIGN §N" cited in the docs,
the protos, the code or the examples names a section docs/DESIGN.md has."""

from __future__ import annotations

import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CITATION = re.compile(r"DESIGN(?:\.md)?\)? ?§ ?(\d+(?:\.\d+)?)(?:-§?(\d+))?")
SKIP_DIRS = {".git", ".venv", "node_modules", ".data", "inventory_svc.egg-info", "__pycache__"}


def files(*suffixes: str) -> list[Path]:
    out = []
    for root, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]  # not into the venv or node_modules
        out += [Path(root) / n for n in names if Path(n).suffix in suffixes]
    return sorted(out)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in doc.read_text().splitlines()
            if line.startswith("#")}


def test_relative_links_resolve() -> None:
    docs = files(".md")
    assert REPO / "README.md" in docs and REPO / "docs" / "OPERATIONS.md" in docs
    broken = []
    for doc in docs:
        for target in LINK.findall(doc.read_text()):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            where = (doc.parent / path).resolve() if path else doc
            if not where.exists() or not where.is_relative_to(REPO):
                broken.append(f"{doc.relative_to(REPO)}: {target}")
            elif anchor and where.suffix == ".md" and anchor not in anchors(where):
                broken.append(f"{doc.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, broken


def test_design_citations_name_sections_that_exist() -> None:
    design = (REPO / "docs" / "DESIGN.md").read_text()
    sections = set(re.findall(r"^##+ (\d+(?:\.\d+)?)\.? ", design, flags=re.MULTILINE))
    assert {"1", "2", "2.1", "2.2", "2.3", "3", "4", "5", "7", "8"} <= sections, sections
    wrong = []
    for path in files(".md", ".proto", ".py", ".js", ".yaml"):
        for first, last in CITATION.findall(path.read_text(errors="replace")):
            for number in filter(None, (first, last)):
                if number not in sections:
                    wrong.append(f"{path.relative_to(REPO)}: §{number}")
    assert not wrong, wrong
