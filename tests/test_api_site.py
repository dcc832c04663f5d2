"""The API reference site: it builds without a warning, and every public name is on it.

The site is built once, in a temporary folder, as .ci/run builds it (warnings as errors,
nitpicky); the checks read its inventory (objects.inv) and its pages.
"""

import importlib
import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = ["asam_jax", "asam_jax.flax", "asam_jax.equinox"]
PUBLIC = [(m, n) for m in MODULES for n in importlib.import_module(m).__all__]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def site(tmp_path_factory):
  out = tmp_path_factory.mktemp("site")
  command = ["-W", "--keep-going", "-n", "-q", "-b", "html", "-d", out / "doctrees"]
  build = subprocess.run(
    [sys.executable, "-m", "sphinx", *command, ROOT / "docs", out / "html"],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert build.returncode == 0, f"the docs build failed:\n{build.stdout}\n{build.stderr}"
  return out / "html"


@pytest.fixture(scope="module")
def inventory(site) -> dict[str, tuple[str, str]]:
  """objects.inv (version 2), by name: (``domain:role``, uri). Four header lines, then
  zlib-compressed lines ``name domain:role priority uri display-name``; a uri ending in
  ``$`` stands for uri + name."""
  header, _, body = site.joinpath("objects.inv").read_bytes().partition(b"zlib.\n")
  assert header.startswith(b"# Sphinx inventory version 2"), header
  entries = {}
  for line in zlib.decompress(body).decode().splitlines():
    match = re.match(r"(\S+)\s+(\S+)\s+-?\d+\s+(\S*)", line)
    if match:
      name, role, uri = match.groups()
      entries[name] = (role, uri.removesuffix("$") + name if uri.endswith("$") else uri)
  return entries


def test_the_build_has_no_warning(site):
  assert (site / "index.html").exists()


def test_the_sites_own_pages_are_linked_not_copied(site):
  """The README links docs/index.md: a copy of it would copy the pages it links in turn,
  under docs/generated/docs/generated/, one level deeper at every build."""
  copies = [p for p in (ROOT / "docs" / "generated" / "docs").rglob("*") if p.is_file()]
  assert copies == []
  assert 'href="../index.html"' in (site / "generated" / "guide.html").read_text()


@pytest.mark.parametrize(("module", "name"), PUBLIC, ids=[f"{m}.{n}" for m, n in PUBLIC])
def test_every_public_name_is_documented(site, inventory, module, name):
  full = f"{module}.{name}"
  assert full in inventory, f"{full} is not in the site's inventory"
  role, uri = inventory[full]
  obj = getattr(importlib.import_module(module), name)
  assert role == ("py:class" if isinstance(obj, type) else "py:function"), role
  page, _, anchor = uri.partition("#")
  html = (site / page).read_text(encoding="utf-8")
  assert f'id="{anchor}"' in html, f"{page} has no anchor {anchor}"
  # Its docstring's example, rendered as a doctest block.
  if ">>>" in (obj.__doc__ or ""):
    assert 'class="doctest' in html, f"{page} lost {full}'s example"
    assert "&gt;&gt;&gt;" in html


def test_the_overview_lists_every_public_name(site):
  overview = (site / "generated" / "api.html").read_text(encoding="utf-8")
  for module, name in PUBLIC:
    assert f'href="{module}.{name}.html' in overview, f"the overview does not link {module}.{name}"


def test_the_front_page_links_the_guide_and_the_reports(site):
  index = (site / "index.html").read_text(encoding="utf-8")
  for page in ["guide", "api", "notebooks", "benchmarks"]:
    assert f'href="generated/{page}.html"' in index, f"the front page does not link {page}"
    assert (site / "generated" / f"{page}.html").exists()
  assert "built with Sphinx" in index
  # The guide links into the reports (README's relative links, rewritten to the site's pages).
  guide = (site / "generated" / "guide.html").read_text(encoding="utf-8")
  assert 'href="notebooks.html#demo"' in guide
  assert 'href="benchmarks.html"' in guide
