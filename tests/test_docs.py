"""The documentation holds together: every page under docs/ is linked from the README, and every relative
link (and its #anchor) in the Markdown pages resolves."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md"))
# The pages that must hold together, and every other Markdown file of the project (vendored trees aside).
REQUIRED = [REPO / "README.md", REPO / "BENCHMARKS.md", REPO / "serve" / "README.md", *DOCS]
SKIP = {"target", "third_party", "node_modules"}
OTHERS = sorted(
    p for p in REPO.rglob("*.md")
    if not any(part.startswith(".") or part in SKIP for part in p.relative_to(REPO).parts[:-1])
    and p not in REQUIRED
)
LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation other than - and _ dropped, spaces to -."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def lines_outside_fences(page: Path):
    fenced = False
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            yield number, line


def anchors(page: Path) -> set[str]:
    """Every heading's slug; a repeated heading gets -1, -2, ... as on GitHub."""
    found: set[str] = set()
    for _, line in lines_outside_fences(page):
        match = HEADING.match(line)
        if match:
            base = slug(match.group(1))
            name, n = base, 0
            while name in found:
                n += 1
                name = f"{base}-{n}"
            found.add(name)
    return found


def links(page: Path):
    for number, line in lines_outside_fences(page):
        line = re.sub(r"`[^`]*`", "", line)  # code spans are not links
        for target in LINK.findall(line):
            if not re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
                yield number, target


def broken_links(pages) -> list[str]:
    broken = []
    for page in pages:
        for number, target in links(page):
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(REPO)}:{number}: {target}"
            if not file.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{where} (no heading with that anchor in {file.relative_to(REPO)})")
    return broken


def test_every_docs_page_is_linked_from_the_readme():
    readme = REPO / "README.md"
    linked = {(readme.parent / t.partition("#")[0]).resolve() for _, t in links(readme) if t.partition("#")[0]}
    missing = [p.name for p in DOCS if p.resolve() not in linked]
    assert DOCS, "no pages under docs/"
    assert not missing, f"docs pages the README does not link: {missing}"


def test_every_relative_link_and_anchor_resolves():
    broken = broken_links(REQUIRED)
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_other_markdown_files_link_correctly_too():
    broken = broken_links(OTHERS)
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_github_slugs():
    assert slug("`kvab check`: the runbook with a verdict") == "kvab-check-the-runbook-with-a-verdict"
    assert slug("Reports (`POST /v1/reports`)") == "reports-post-v1reports"
    assert slug("What `make` installs") == "what-make-installs"
    assert slug("Cluster mode: what it reads, and the RBAC it needs") == "cluster-mode-what-it-reads-and-the-rbac-it-needs"
    assert slug("snake_case and-dashes") == "snake_case-and-dashes"
