"""The documentation's shape: a short front page, and every relative link of README.md and
docs/**/*.md pointing at a file that exists (and, with a #anchor, at a heading of that page).

External http(s) and mailto links are not followed (no network)."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README_MAX_LINES = 250

# [text](target) and ![alt](target); the target ends at whitespace or ")" (an optional "title"
# after a space is ignored). Text inside code spans and fenced blocks is not a link.
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")


def _pages() -> list[pathlib.Path]:
  return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _prose_lines(path: pathlib.Path):
  """(line number, text) of the lines outside fenced code blocks, code spans blanked."""
  fenced = False
  for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
    if FENCE.match(line):
      fenced = not fenced
      continue
    if not fenced:
      yield number, CODE_SPAN.sub("", line)


def slug(heading: str) -> str:
  """GitHub's anchor for a heading: lowercase, every character but letters, digits, spaces,
  hyphens and underscores dropped, spaces turned into hyphens."""
  text = heading.strip().lower()
  text = re.sub(r"[^\w\- ]", "", text)
  return text.replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
  """The anchors of a markdown page's headings (a repeated one gets -1, -2, ... as on GitHub)."""
  seen: dict[str, int] = {}
  result = set()
  fenced = False
  for line in path.read_text(encoding="utf-8").splitlines():
    if FENCE.match(line):
      fenced = not fenced
      continue
    match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
    if fenced or not match:
      continue
    base = slug(match.group(1))
    count = seen.get(base, 0)
    seen[base] = count + 1
    result.add(base if count == 0 else f"{base}-{count}")
  return result


def links(path: pathlib.Path):
  """(line number, target) of every markdown link and image on the page."""
  for number, line in _prose_lines(path):
    for match in LINK.finditer(line):
      yield number, match.group(1)


def broken_links(path: pathlib.Path) -> list[str]:
  problems = []
  for number, target in links(path):
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:, ...
      continue
    file_part, _, anchor = target.partition("#")
    linked = (path.parent / file_part).resolve() if file_part else path
    where = f"{path.relative_to(ROOT)}:{number}: {target}"
    if not linked.exists():
      problems.append(f"{where}: no file {linked.relative_to(ROOT) if linked.is_relative_to(ROOT) else linked}")
    elif anchor:
      if linked.suffix != ".md":
        problems.append(f"{where}: an anchor on a file that is not a markdown page")
      elif anchor not in anchors(linked):
        problems.append(f"{where}: no heading with the anchor #{anchor} in {linked.name}")
  return problems


def test_readme_is_a_short_front_page():
  lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
  assert len(lines) <= README_MAX_LINES, (
      f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move reference material "
      "into a docs/ page and link it")


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
  assert not broken_links(page), "\n".join(broken_links(page))


def test_every_docs_page_is_linked_from_the_readme():
  linked = {(ROOT / target.partition("#")[0]).resolve()
            for _, target in links(ROOT / "README.md") if target.partition("#")[0]}
  pages = {path.resolve() for path in (ROOT / "docs").glob("*.md")}
  assert not pages - linked, f"docs pages the README does not link: {sorted(p.name for p in pages - linked)}"


def test_slug_is_githubs():
  assert slug("The demo (`make demo`)") == "the-demo-make-demo"
  assert slug("Input pipeline / data") == "input-pipeline--data"
  assert slug("The paper's benchmarks") == "the-papers-benchmarks"
  assert slug("Set-up: two commands") == "set-up-two-commands"
  assert slug("On TPU slices, from the TPU compiler (no TPU needed)") == (
      "on-tpu-slices-from-the-tpu-compiler-no-tpu-needed")
