"""scripts/mutants.py cannot rot: every mutant's text is still in its file exactly
once, the mutated file still parses, and its tests exist (the mutation run itself
is `python scripts/mutants.py`, minutes long; docs/DESIGN.md, "Mutation check")."""

import ast
import importlib.util
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_mutants():
  spec = importlib.util.spec_from_file_location("mutants", REPO / "scripts" / "mutants.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_every_mutant_applies_once_and_parses():
  m = load_mutants()
  assert len(m.MUTANTS) >= 15
  assert len({x.name for x in m.MUTANTS}) == len(m.MUTANTS)
  for mutant in m.MUTANTS:
    text = m.check(mutant)   # raises unless the text is there exactly once
    assert text != (REPO / mutant.path).read_text(), mutant.name
    ast.parse(text)
    for test in mutant.tests:
      path, name = test.split("::")
      assert f"def {name}(" in (REPO / path).read_text(), (mutant.name, test)


def test_check_reports_a_missing_text():
  m = load_mutants()
  bad = m.Mutant("gone", m.GLARE, "no such line in the file", "x", ())
  with pytest.raises(ValueError, match="gone.*0 times"):
    m.check(bad)
