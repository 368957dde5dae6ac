"""The README's install lines and its API snippet, run as written (it builds the tiny model: no download)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"


def test_install_gives_the_cpu_wheel_line_and_the_fast_test_subset():
    text = README.read_text()
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in text
    assert 'python -m pytest -q -m "not slow"' in text
    assert re.search(r"the tests .*about \d+ minutes", text), "the README says how long the tests take"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_api_snippet_runs_as_written(tmp_path, monkeypatch):
    pytest.importorskip("onnxscript", reason="the onnx extra is not installed")
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    snippet = README.read_text().split("## API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(snippet, "README.md (API)", "exec"), scope)
    assert scope["tokens"].shape == (2, 8 + 32) and scope["logits"].shape == (2, 8, 32000)
    assert len(scope["sites"]) == 4 and len(scope["predictors"]) == 4
    assert {"model.onnx", "plain.onnx", "sparse.onnx", "p.safetensors"} <= {p.name for p in tmp_path.iterdir()}
