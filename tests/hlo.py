"""Reading compiled HLO text: which operations run where."""

import re

_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_INSTRUCTION = re.compile(r"=\s*\S+(?:\s*\([^)]*\))?\s+([a-z][a-z0-9\-]*)\(")
_CALLS = re.compile(
  r"(?:calls|to_apply|body|condition|branch_computations)=\{?([^}\s]+(?:,\s*%[^,}\s]+)*)\}?"
)


def computations(hlo: str) -> dict[str, tuple[set[str], set[str]]]:
  """Each computation's opcodes and the computations it calls."""
  out, name = {}, None
  for line in hlo.splitlines():
    if m := _COMPUTATION.match(line.strip()):
      name = m.group(1)
      out[name] = (set(), set())
    elif name and (m := _INSTRUCTION.search(line)):
      out[name][0].add(m.group(1))
      for called in _CALLS.findall(line):
        out[name][1].update(c.strip().lstrip("%") for c in called.split(","))
  return out


def ops_inside_conditionals(hlo: str) -> set[str]:
  """The opcodes that run inside a branch of some ``conditional``, however deeply nested."""
  comps = computations(hlo)
  todo = [
    c.strip().lstrip("%")
    for line in hlo.splitlines()
    if " conditional(" in line
    for group in re.findall(r"branch_computations=\{([^}]*)\}", line)
    for c in group.split(",")
  ]
  seen, ops = set(), set()
  while todo:
    name = todo.pop()
    if name in seen or name not in comps:
      continue
    seen.add(name)
    ops |= comps[name][0]
    todo.extend(comps[name][1])
  return ops
