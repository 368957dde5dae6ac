"""The benchmark scripts that can run without a GPU, run small, so they do not rot between GPU sessions."""
import json
import math
import sys

import pytest


@pytest.mark.slow
def test_onnxruntime_rows_smoke_run_writes_every_row(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
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
    assert decode["ORT exact"]["tokens_equal_dense"] is True
    # times are differences of timings on a shared machine (one came out at -30 ms): check the row's structure
    for r in data["rows"]:
        assert isinstance(r["ms"], float) and math.isfinite(r["ms"]) and r["batch"] == 1, r
    for r in decode.values():
        assert r["tok_s"] == pytest.approx(r["batch"] / r["ms"] * 1e3) and [len(t) for t in r["tokens"]] == [4], r
    assert data["facts"]["onnxruntime"] and data["smoke"] is True


@pytest.mark.slow
def test_decode_e2e_smoke_run_on_the_trained_model_writes_rows_and_a_plot(tmp_path, monkeypatch):
    import importlib.util

    from benchmarks import decode_e2e

    has_matplotlib = importlib.util.find_spec("matplotlib") is not None  # the bench extra, not the test one
    out, png = tmp_path / "e2e.json", tmp_path / "e2e.png"
    monkeypatch.setattr(sys, "argv", ["decode_e2e.py", "--smoke", "--pretrained", "austen-small", "--prompt", "8",
                                      "--new", "4", "--repeats", "1", "--json", str(out),
                                      "--plot", str(png) if has_matplotlib else ""])
    decode_e2e.main()
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["dense eager", "dense compiled (eager backend)", "bamboo exact",
                                            "bamboo predictor 15%"]
    for r in rows:  # structure, not timing: a step time is a difference of two timings on a shared machine
        assert isinstance(r["step_ms"], float) and math.isfinite(r["step_ms"]), r
        assert r["tok_s"] == pytest.approx(r["batch"] / r["step_ms"] * 1e3) and r["batch"] == 1, r
    assert png.exists() == has_matplotlib
    assert "trained weights" in rows[2]["note"]


@pytest.mark.slow
def test_cpu_benchmark_smoke_run_writes_every_row(tmp_path, monkeypatch):
    from benchmarks import cpu

    out = tmp_path / "cpu.json"
    monkeypatch.setattr(sys, "argv", ["cpu.py", "--smoke", "--dtypes", "bfloat16", "float32", "--fractions", "0.15",
                                      "--models", "1b", "--json", str(out), "--plot", ""])
    cpu.main()
    data = json.loads(out.read_text())
    layer = [(r["dtype"], r["variant"]) for r in data["rows"] if r["part"] == "ffn layer"]
    assert layer == [(d, v) for d in ("bfloat16", "float32")
                     for v in ("dense", "exact", "predictor 15%", "torch reference exact")]
    decode = [r["variant"] for r in data["rows"] if r["part"] != "ffn layer"]
    assert decode == ["dense eager", "exact", "predictor 15%"]
    for r in data["rows"]:
        assert r["ms"] > 0 and r["vs_dense"] > 0 and r["floor_share"] > 0 and r["bytes"] > 0
    assert data["read_bandwidth_bytes_per_s"] > 0 and data["smoke"] is True and data["command"].startswith("python")
    assert {"cpu", "cores", "torch", "load_average", "kernel_built"} <= set(data["facts"])
