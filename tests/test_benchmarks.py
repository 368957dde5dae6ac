"""The benchmark scripts that can run without a GPU, run small, so they do not rot between GPU sessions."""
import json
import sys

import pytest

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")


@pytest.mark.slow
def test_onnxruntime_rows_smoke_run_writes_every_row(tmp_path, monkeypatch):
    from benchmarks import onnxruntime_rows

    out = tmp_path / "ort.json"
    monkeypatch.setattr(sys, "argv", ["onnxruntime_rows.py", "--smoke", "--batch", "1", "--fractions", "0.15",
                                      "--new", "4", "--json", str(out)])
    onnxruntime_rows.main()
    data = json.loads(out.read_text())
    variants = [(r["part"].split(" (")[0], r["variant"]) for r in data["rows"]]
    assert variants == [("ffn layer", "ORT dense"), ("ffn layer", "ORT exact"), ("ffn layer", "ORT predictor 15%"),
                        ("decode step", "ORT dense"), ("decode step", "ORT exact"), ("decode step", "ORT predictor 15%")]
    ffn = {r["variant"]: r for r in data["rows"] if r["part"] == "ffn layer"}
    assert ffn["ORT dense"]["rel_err_vs_dense_torch"] < 1e-5 and ffn["ORT exact"]["rel_err_vs_dense_torch"] < 1e-5
    decode = {r["variant"]: r for r in data["rows"] if r["part"] != "ffn layer"}
    assert decode["ORT exact"]["tokens_equal_dense"] is True and all(r["ms"] > 0 for r in data["rows"])
    assert data["facts"]["onnxruntime"] and data["smoke"] is True
