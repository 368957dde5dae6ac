"""The mutation tool itself, on a snippet and a throwaway tree (no bamboo test runs here: a few seconds)."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("mutation_test", ROOT / "tools" / "mutation_test.py")
mt = importlib.util.module_from_spec(spec)
sys.modules["mutation_test"] = mt
spec.loader.exec_module(mt)

SNIPPET = '''def f(a, b: int = 3):
    """A docstring is never mutated."""
    if a < b and b > 0:
        return max(a, b) + 1
    log(a)
    return a * b
'''


def test_operators_on_a_snippet():
    found = {(m.operator, m.original, m.replacement) for m in mt.mutations_of_source(SNIPPET)}
    for expected in [("compare", "a < b", "a <= b"), ("bool_op", "a < b and b > 0", "a < b or b > 0"),
                     ("negate", "a < b and b > 0", "not (a < b and b > 0)"), ("swap_name", "max", "min"),
                     ("arith", "max(a, b) + 1", "max(a, b) - 1"), ("constant", "1", "0"), ("constant", "0", "1"),
                     ("arith", "a * b", "a / b"), ("drop_call", "log(a)", "pass"), ("constant", "3", "4")]:
        assert expected in found, expected
    assert not any("docstring" in m.original for m in mt.mutations_of_source(SNIPPET))
    assert not any(m.original == "int" for m in mt.mutations_of_source(SNIPPET))  # annotations are left alone
    for m in mt.mutations_of_source(SNIPPET):  # every mutant is valid Python that differs from the source
        mutated = mt.apply(SNIPPET, m)
        compile(mutated, "<mutant>", "exec")
        assert mutated != SNIPPET


def test_a_mutant_is_killed_by_a_test_that_pins_it_and_survives_a_weak_one(tmp_path):
    (tmp_path / "pkg").mkdir()
    source = "def add(a, b):\n    return a + b\n"
    (tmp_path / "pkg" / "mod.py").write_text(source)
    (tmp_path / "test_strong.py").write_text("from pkg.mod import add\n\ndef test_add():\n    assert add(2, 3) == 5\n")
    (tmp_path / "test_weak.py").write_text("from pkg.mod import add\n\ndef test_add():\n    assert add(0, 0) == 0\n")
    (mutant,) = [m for m in mt.mutations_of_source(source, "pkg/mod.py") if m.operator == "arith"]
    assert mt.run_mutant(mutant, tmp_path, timeout=60, tests=["test_strong.py"]).status == "killed"
    assert mt.run_mutant(mutant, tmp_path, timeout=60, tests=["test_weak.py"]).status == "survived"
    assert (tmp_path / "pkg" / "mod.py").read_text() == source  # restored after each run
    assert "survivors:" in mt.report([mutant]) and "pkg/mod.py:2" in mt.report([mutant])


def test_every_package_maps_to_tests_that_exist():
    for package in mt.DEFAULT_PACKAGES:
        assert mt.tests_for(package + "/x.py"), package
        assert all((ROOT / t).exists() for t in mt.tests_for(package + "/x.py"))
    assert mt.tests_for("bamboo/ops/sparse_ffn_onnx.py")[0].startswith("tests/onnx")
