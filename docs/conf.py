"""Sphinx configuration of the asam_jax API reference.

Two kinds of page are written, at every build, under ``docs/generated/`` (git-ignored):

- the API reference: one page per name in ``asam_jax.__all__``, ``asam_jax.flax.__all__``
  and ``asam_jax.equinox.__all__``, and an overview that lists them, so that a name added
  to an ``__all__`` appears without editing the docs;
- the guide and the reports: the README, ``notebooks/README.md``, ``benchmarks/README.md``
  and the reports they link, with their relative links rewritten to the site's pages (a
  link to another README becomes a link to its page, a link to any other file a download,
  a link to a folder its path as text).

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
from pathlib import Path

from docutils import nodes

import asam_jax

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
GENERATED = DOCS / "generated"

project = "asam_jax"
author = "the asam_jax authors"
copyright = "the asam_jax authors"
release = version = asam_jax.__version__

extensions = [
  "myst_parser",
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
  "sphinx.ext.viewcode",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
root_doc = "index"

# Google-style docstrings: Args, Returns, Example and References sections.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = False
# Not the fields' annotations (``chex.Array``, which napoleon expands into its union): the
# Attributes text says what each holds.
napoleon_attr_annotations = False

# The parameter types go to the argument list, the signature stays short, and a long one is
# written one parameter a line.
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
autosummary_generate = False
# The annotations' aliases by name, not expanded into their unions.
autodoc_type_aliases = {
  "ScalarOrSchedule": "optax.ScalarOrSchedule",
  "chex.Array": "jax.Array",
  "chex.Numeric": "chex.Numeric",
  "chex.PRNGKey": "jax.Array",
  "optax.Params": "optax.Params",
  "optax.Updates": "optax.Updates",
  "optax.Schedule": "optax.Schedule",
  "nnx.Module": "nnx.Module",
}
maximum_signature_line_length = 88
# Every cross-reference resolves (a :func: to a name that is not public fails the build),
# except the other libraries' types: without intersphinx (the build needs no network) they
# have no target.
nitpicky = True
nitpick_ignore_regex = [("py:class", r"(collections\.abc|jax|chex|optax|flax|nnx)\..*")]
add_module_names = False
python_display_short_literal_types = True

# Markdown (myst): GitHub's heading anchors, so that the READMEs' #anchors resolve.
myst_heading_anchors = 4
myst_enable_extensions = ["colon_fence"]
suppress_warnings = ["myst.header"]

html_theme = "furo"
html_title = f"asam_jax {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_show_sourcelink = False
html_copy_source = False
pygments_style = "default"
pygments_dark_style = "monokai"


# The API reference, from the modules' __all__.

MODULES = ["asam_jax", "asam_jax.flax", "asam_jax.equinox"]
MODULE_INTROS = {
  "asam_jax": "The transformations, their states, and the functions around them.",
  "asam_jax.flax": "Flax Linen and NNX (``import asam_jax.flax``; needs ``asam_jax[flax]``).",
  "asam_jax.equinox": "Equinox (``import asam_jax.equinox``; needs ``asam_jax[equinox]``).",
}


def public_names() -> dict[str, list[str]]:
  """Each public module's ``__all__``, in its order."""
  return {m: list(importlib.import_module(m).__all__) for m in MODULES}


def _heading(text: str, char: str) -> str:
  return f"{text}\n{char * len(text)}\n"


def _object_page(module: str, name: str) -> str:
  obj = getattr(importlib.import_module(module), name)
  if inspect.isclass(obj):
    # The methods it defines; its fields (NamedTuple, dataclass) are the docstring's Attributes.
    directive = f".. autoclass:: {name}\n   :members:\n"
    fields = [*getattr(obj, "_fields", ()), *getattr(obj, "__dataclass_fields__", ())]
    if fields:
      directive += f"   :exclude-members: {', '.join(fields)}\n"
  else:
    directive = f".. autofunction:: {name}\n"
  return f"{_heading(f'{module}.{name}', '=')}\n.. currentmodule:: {module}\n\n{directive}"


def _builds_tx(function) -> bool:
  """Whether ``function`` returns an optax transformation (by its return annotation)."""
  returns = inspect.signature(function).return_annotation
  return "GradientTransformation" in str(getattr(returns, "__name__", returns))


def _api_overview(names: dict[str, list[str]]) -> str:
  parts = [
    _heading("API reference", "="),
    "Every public name, generated from the modules' ``__all__``. Each page has the "
    "signature, the arguments, a doctested example and the references.\n",
  ]
  for module, members in names.items():
    mod = importlib.import_module(module)
    classes = [n for n in members if inspect.isclass(getattr(mod, n))]
    transformations = [n for n in members if n not in classes and _builds_tx(getattr(mod, n))]
    functions = [n for n in members if n not in classes + transformations]
    groups = [transformations, functions, classes]
    parts += [_heading(module, "-"), f".. currentmodule:: {module}\n", MODULE_INTROS[module] + "\n"]
    if module != "asam_jax":  # two names: one table
      groups = [[n for group in groups for n in group]]
    states = all(n.endswith("State") for n in classes)
    titles = ["Transformations", "Functions", "States" if states else "Classes"]
    for title, group in zip(titles, groups, strict=False):
      if not group:
        continue
      if len(groups) > 1:
        parts.append(_heading(title, "~"))
      parts.append(".. autosummary::\n   :nosignatures:\n\n" + "".join(f"   {n}\n" for n in group))
    # The sidebar: the short names (a submodule's with its own name), in the tables' order.
    prefix = module.removeprefix("asam_jax").lstrip(".")
    pages = "".join(
      f"   {f'{prefix}.{n}' if prefix else n} <{module}.{n}>\n" for group in groups for n in group
    )
    parts.append(f".. toctree::\n   :hidden:\n\n{pages}")
  return "\n".join(parts)


# The guide and the reports, from the repository's markdown.

PAGES = {
  "README.md": "guide",
  "notebooks/README.md": "notebooks",
  "benchmarks/README.md": "benchmarks",
}
# The README's title is the project's name, which the site's front page has: there it is the guide.
TITLES = {"README.md": "Guide"}
# Where a bare name in a code span is a label (the benchmark's methods ``sam``, ``gsam``, beside
# ``asam_p2``), not the function: there only calls and qualified names link to the API.
LABELS = {"benchmarks/README.md"}
LINK = re.compile(r"(!?)\[((?:[^\[\]]|\[[^\]]*\])*)\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")
CODE = re.compile(r"(?<!`)`([^`]+)`(?!`)")


def _page_of(source: str) -> str:
  """The docname of a repository markdown file: the three READMEs by name, others by path."""
  return PAGES.get(source, source.removesuffix(".md"))


def _api_links(names: dict[str, list[str]]) -> dict[str, str]:
  """The names in code spans that link to a public object (``sam``, ``asam_jax.sam``,
  ``asam_jax.flax.TrainState``), to the object's full name."""
  links = {f"{module}.{n}": f"{module}.{n}" for module, members in names.items() for n in members}
  links.update({n: f"asam_jax.{n}" for n in names["asam_jax"]})
  return links


def _table_row(line: str) -> str:
  """A table row with the pipes inside its code spans escaped: unescaped, GitHub's tables and
  myst's split the cell there (the README's ``|T g|``)."""
  parts = line.split("`")
  for i in range(1, len(parts) - 1, 2):
    parts[i] = re.sub(r"(?<!\\)\|", r"\\|", parts[i])
  return "`".join(parts)


def _rewrite(source: str, text: str, api: dict[str, str]) -> tuple[str, set[str]]:
  """``source``'s markdown with its relative links pointed from ``generated/`` and the code
  spans that name a public object linked to its page; the markdown files it links."""
  here = (ROOT / source).parent
  page_dir = (GENERATED / _page_of(source)).parent
  found: set[str] = set()

  def link(match: re.Match[str]) -> str:
    bang, label, target = match.groups()
    if re.match(r"[a-z][a-z+.-]*:", target) or target.startswith("#"):
      return match.group(0)
    path, _, anchor = target.partition("#")
    resolved = (here / path).resolve()
    if not resolved.is_relative_to(ROOT):
      return match.group(0)  # myst says where it points
    rel = resolved.relative_to(ROOT).as_posix()
    if resolved.suffix == ".md" and resolved.is_file():
      if resolved.is_relative_to(DOCS):
        # One of the site's own pages (the README links docs/index.md), which Sphinx builds
        # where it is: copied, its links into generated/ would be copied in turn, one level
        # deeper at every build.
        page = resolved
      else:
        found.add(rel)
        page = GENERATED / f"{_page_of(rel)}.md"
      new = Path(os.path.relpath(page, page_dir)).as_posix()
      return f"[{label}]({new}{'#' + anchor if anchor else ''})"
    if resolved.is_dir():
      # A folder is no page and no download: its path, as text.
      return label if label.strip("`") != path else f"`{rel}/`"
    new = Path(os.path.relpath(resolved, page_dir)).as_posix()
    return f"{bang}[{label}]({new})"  # an image, or a download (myst) of any other file

  def code(match: re.Match[str]) -> str:
    name, text, start = match.group(1), match.string, match.start()
    heading = text.startswith("#", text.rfind("\n", 0, start) + 1)  # as links, below
    label = text[start - 1 : start] == "[" and text[match.end() : match.end() + 1] == "]"
    # A name, or a call of one (the README's ``sam(rho=0.05, *, ...)``).
    called = name.split("(")[0] if name.endswith(")") else None
    bare = source in LABELS and "." not in name and called is None
    target = None if bare else api.get(name) or api.get(called or "")
    if target is None or heading or label or "<" in name:
      return match.group(0)
    return f"{{py:obj}}`{name} <{target}>`"

  # The text in stretches, fenced code or not: code spans may span lines, so they are matched
  # in a whole stretch; links, table rows and headings line by line.
  stretches: list[tuple[bool, list[str]]] = [(False, [])]
  for line in text.splitlines(keepends=True):
    fenced = stretches[-1][0]
    if FENCE.match(line.lstrip()):
      if not fenced:
        stretches.append((True, []))
      stretches[-1][1].append(line)
      if fenced:
        stretches.append((False, []))
      continue
    if not fenced and line.startswith("#"):
      # A link in a heading would be in the page's table of contents, which Sphinx 9 cannot
      # write (KeyError: 'anchorname'): its label stays, so GitHub's anchor does too.
      line = LINK.sub(lambda m: m.group(2), line)
    elif not fenced:
      line = LINK.sub(link, _table_row(line) if line.lstrip().startswith("|") else line)
    stretches[-1][1].append(line)
  out = [
    "".join(lines) if fenced else CODE.sub(code, "".join(lines)) for fenced, lines in stretches
  ]
  text = "".join(out)
  if source in TITLES:
    text = re.sub(r"^# .*$", f"# {TITLES[source]}", text, count=1, flags=re.MULTILINE)
  if not text.lstrip().startswith("# "):
    # A generated report has no title: its path is one.
    text = f"# {source}\n\n{text}"
  if source not in PAGES:
    text = f"---\norphan: true\n---\n\n{text}"
  return text, found


def _markdown_pages(names: dict[str, list[str]]) -> dict[str, str]:
  """The generated markdown pages, by docname: the READMEs and every report they link."""
  todo, done, api = list(PAGES), {}, _api_links(names)
  while todo:
    source = todo.pop()
    if source in done:
      continue
    text, found = _rewrite(source, (ROOT / source).read_text(encoding="utf-8"), api)
    done[source] = text
    todo += sorted(found)
  return {_page_of(source): text for source, text in done.items()}


def _write(path: Path, text: str) -> None:
  """Writes only what changed, so that Sphinx rebuilds only what changed, and whole (through a
  temporary file), so that builds running at once (pytest-xdist workers) read whole pages."""
  path.parent.mkdir(parents=True, exist_ok=True)
  if not path.exists() or path.read_text(encoding="utf-8") != text:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def generate(app) -> None:
  """Writes ``docs/generated/``: the API pages and the markdown pages; removes stale ones."""
  files = {}
  names = public_names()
  files["api.rst"] = _api_overview(names)
  for module, members in names.items():
    for name in members:
      files[f"{module}.{name}.rst"] = _object_page(module, name)
  for docname, text in _markdown_pages(names).items():
    files[f"{docname}.md"] = text
  for rel, text in files.items():
    _write(GENERATED / rel, text)
  for path in GENERATED.rglob("*"):
    stale = path.relative_to(GENERATED).as_posix() not in files and not path.name.endswith(".tmp")
    if path.is_file() and stale:
      path.unlink(missing_ok=True)


# The types autodoc adds to the argument lists, tidied.

ALIAS_REPR = re.compile(r"TypeAliasForwardRef\('([^']*)'\)")


def tidy_types(app, domain, objtype, content) -> None:
  """An alias inside a union or a ``Callable`` by its name, not its repr (Sphinx 9 writes
  ``TypeAliasForwardRef('jax.Array') | None``), and no ``Any``: it says nothing the text
  does not."""
  for fields in content.findall(nodes.field_list):
    for field in list(fields):
      name, body = field[0].astext(), field[1]
      if not (name.startswith("type ") or name == "rtype"):
        continue
      text = ALIAS_REPR.sub(r"\1", body.astext())
      if text.lstrip("~") in ("Any", "typing.Any"):
        fields.remove(field)
      else:
        body.clear()
        body += nodes.paragraph("", text)


def setup(app):
  app.connect("builder-inited", generate, priority=100)
  # After autodoc's typehints (500) add the types, before the fields are rendered.
  app.connect("object-description-transform", tidy_types, priority=600)
  return {"parallel_read_safe": True}
