"""The layer contract in pyproject.toml ([tool.importlinter]): data flows model -> capture -> passes -> backend
and no module imports a layer above it (the op's meaning in bamboo/ops imports no kernel, no backend or ONNX
module imports bamboo.api)."""
from pathlib import Path

import pytest

importlinter_cli = pytest.importorskip("importlinter.cli", reason="import-linter is in the test extra")

ROOT = Path(__file__).resolve().parents[1]


def test_no_module_imports_a_layer_above_it(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    assert importlinter_cli.lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0, \
        "run `lint-imports` for the offending import chains"
