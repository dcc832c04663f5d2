"""The docs point at things that exist: relative links, heading anchors and cited tests."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted(p for p in [ROOT / "README.md", *ROOT.glob("*/README.md")] if p.exists())
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CITED_TEST = re.compile(r"(tests/[\w/]+\.py)::(\w+)")


def _anchors(markdown: str) -> set[str]:
  """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
  headings = re.findall(r"^#+\s+(.*?)\s*$", markdown, flags=re.MULTILINE)
  return {re.sub(r"[^\w\- ]", "", h.lower().replace("`", "")).replace(" ", "-") for h in headings}


def test_the_docs_are_found():
  assert ROOT / "README.md" in DOCS


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_exist(doc):
  text = doc.read_text()
  for target in LINK.findall(text):
    if re.match(r"[a-z]+:", target):
      continue  # http(s), mailto: not checked offline
    path, _, anchor = target.partition("#")
    linked = (doc.parent / path).resolve() if path else doc
    assert linked.exists(), f"{doc.name} links to missing {target}"
    if anchor and linked.suffix == ".md":
      assert anchor in _anchors(linked.read_text()), f"{doc.name}: no heading for #{anchor}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_cited_tests_exist(doc):
  for path, name in CITED_TEST.findall(doc.read_text()):
    source = ROOT / path
    assert source.exists(), f"{doc.name} cites missing {path}"
    assert re.search(rf"^def {name}\(", source.read_text(), flags=re.MULTILINE), (
      f"{doc.name} cites {path}::{name}, which is not a test there"
    )
