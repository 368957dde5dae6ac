"""The layer contract in pyproject.toml ([tool.importlinter]): data flows model -> capture -> passes -> backend
and no module imports a layer above it (the op's meaning in bamboo/ops imports no kernel, no backend or ONNX
module imports bamboo.api)."""
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter", reason="import-linter is in the test extra")

ROOT = Path(__file__).resolve().parents[1]
# in a child process: import-linter configures logging with dictConfig, which disables every existing logger
LINT = ("import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True))")


def test_no_module_imports_a_layer_above_it():
    result = subprocess.run([sys.executable, "-c", LINT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
