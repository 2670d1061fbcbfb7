"""The documentation's links: every relative link and picture resolves, and none leaves the repository.

Checks README.md, CHANGELOG.md and docs/*.md. A link is a markdown link or picture (`[text](target)`,
`![alt](target)`, `[label]: target`) or an HTML `href`/`src`, outside code. Its target must be a file of the
repository (no URL, no absolute path, no `..` that climbs out of the root), and an anchor (`#x`, `page.md#x`) must
name a heading of that page, spelt as GitHub spells heading anchors.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.S | re.M)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$", re.M)
HTML = re.compile(r"""\b(?:href|src)\s*=\s*["']([^"']+)["']""", re.I)
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$", re.M)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def doc_files(root: Path = ROOT) -> list[Path]:
    """The pages whose links are checked."""
    return [root / "README.md", root / "CHANGELOG.md", *sorted((root / "docs").glob("*.md"))]


def prose(text: str) -> str:
    """The text without fenced code blocks and code spans, where brackets are code, not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def links(text: str) -> list[str]:
    """Every link target of a page, in order."""
    body = prose(text)
    return [m.group(1) for pattern in (INLINE, REFERENCE, HTML) for m in pattern.finditer(body)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors a page's headings give; a repeated heading gets -1, -2... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for m in HEADING.finditer(FENCE.sub("", page.read_text(encoding="utf-8"))):
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def problems(page: Path, root: Path = ROOT) -> list[str]:
    """What is wrong with a page's links: one line each, naming the page and the target."""
    bad = []
    name = page.relative_to(root)
    for target in links(page.read_text(encoding="utf-8")):
        if SCHEME.match(target) or target.startswith("//"):
            bad.append(f"{name}: {target}: points outside the repository (a URL)")
            continue
        if target.startswith("/"):
            bad.append(f"{name}: {target}: an absolute path; links are relative to the page")
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.is_relative_to(root.resolve()):
            bad.append(f"{name}: {target}: points outside the repository")
            continue
        if not dest.exists():
            bad.append(f"{name}: {target}: no such file")
            continue
        if anchor:
            if dest.suffix != ".md" or not dest.is_file():
                bad.append(f"{name}: {target}: an anchor into a file that is not a markdown page")
            elif anchor not in anchors(dest):
                bad.append(f"{name}: {target}: no heading with the anchor #{anchor} in {dest.relative_to(root)}")
    return bad


@pytest.mark.parametrize("page", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves_inside_the_repository(page):
    assert page.is_file(), f"{page.relative_to(ROOT)} is missing"
    assert problems(page) == []


def test_the_readme_links_every_page_of_docs():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links((ROOT / "README.md").read_text(encoding="utf-8"))}
    pages = set((ROOT / "docs").glob("*.md"))
    assert pages, "docs/ has no pages"
    assert sorted(p.name for p in pages if p.resolve() not in linked) == []


def test_the_checker_finds_each_kind_of_bad_link(tmp_path):
    """The check can fail: a missing file, a missing picture, a bad anchor, an escape, a URL, an absolute path."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "pic.png").write_bytes(b"")
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## Seeing it: `i2v show`\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Page\n\n"
        "[fine](other.md) [fine anchor](other.md#seeing-it-i2v-show) ![fine](pic.png) [self](#page)\n"
        "[gone](missing.md) ![gone](nope.png) [anchor](other.md#nowhere) [up](../../outside.md)\n"
        '[web](https://example.org/x) [abs](/etc/passwd) <img src="lost.jpg">\n'
        "[ref]: ../../ref.md\n\n"
        "```sh\n[not a link](nowhere.md)\n# not a heading\n```\n"
        "`[code](nowhere.md)`\n"
    )
    found = problems(page, tmp_path)
    for target in ("missing.md", "nope.png", "other.md#nowhere", "../../outside.md", "https://example.org/x",
                   "/etc/passwd", "lost.jpg", "../../ref.md"):  # fmt: skip
        assert any(f": {target}: " in line for line in found), (target, found)
    assert len(found) == 8, found


def test_slug_follows_github():
    assert slug("Seeing what the model sees: `i2v show`") == "seeing-what-the-model-sees-i2v-show"
    assert slug("Loading a model, and the WD taggers") == "loading-a-model-and-the-wd-taggers"
    assert slug("Feature vectors and similar images: `i2v embed`, `i2v index`") == (
        "feature-vectors-and-similar-images-i2v-embed-i2v-index"
    )
