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
def test_decode_e2e_smoke_run_on_the_trained_model_writes_rows_and_merges_parts(tmp_path, monkeypatch):
    import importlib.util

    from benchmarks import decode_e2e

    has_matplotlib = importlib.util.find_spec("matplotlib") is not None  # the bench extra, not the test one
    common = ["decode_e2e.py", "--smoke", "--pretrained", "austen-small", "--prompt", "8", "--new", "4",
              "--repeats", "1", "--plot", ""]
    part1, part2, merged, png = (tmp_path / n for n in ("a.json", "b.json", "all.json", "all.png"))
    # two parts, as benchmarks/gpu_session.sh runs them, then one merged file
    monkeypatch.setattr(sys, "argv", common + ["--batch", "1", "4", "--variants", "compiled", "exact",
                                               "--json", str(part1)])
    decode_e2e.main()
    monkeypatch.setattr(sys, "argv", common + ["--batch", "1", "--variants", "eager", "predictor", "threshold",
                                               "--json", str(part2)])
    decode_e2e.main()
    monkeypatch.setattr(sys, "argv", ["decode_e2e.py", "--merge", str(part1), str(part2), "--json", str(merged),
                                      "--plot", str(png) if has_matplotlib else ""])
    decode_e2e.main()
    data = json.loads(merged.read_text())
    rows = {(r["batch"], r["variant"]): r for r in data["rows"]}
    assert list(rows) == [(1, "dense compiled (eager backend)"), (1, "bamboo exact"), (4, "dense compiled (eager backend)"),
                          (4, "bamboo exact, dense FFN (4 rows > BAMBOO_SPARSE_MAX_ROWS=2)"), (1, "dense eager"),
                          (1, "bamboo predictor 15%, cap k"), (1, "bamboo predictor ~15%, threshold only")]
    for r in rows.values():  # structure, not timing: a step time is a difference of two timings on a shared machine
        assert isinstance(r["step_ms"], float) and math.isfinite(r["step_ms"]), r
        assert r["tok_s"] == pytest.approx(r["batch"] / r["step_ms"] * 1e3), r
        assert r["vs_dense_compiled"] == pytest.approx(r["tok_s"] / rows[(r["batch"], "dense compiled (eager backend)")]["tok_s"])
        assert r["bytes_per_step"] == data["outside_ffn_bytes"] + r["ffn_bytes_per_step"] + 2 * 6 * r["batch"] * 2 * 12 * 64 * 2
    dense_ffn = rows[(1, "dense eager")]["ffn_bytes_per_step"]
    assert rows[(4, "bamboo exact, dense FFN (4 rows > BAMBOO_SPARSE_MAX_ROWS=2)")]["ffn_bytes_per_step"] == dense_ffn
    assert 0 < rows[(1, "bamboo exact")]["ffn_bytes_per_step"] < dense_ffn
    assert "trained weights" in rows[(1, "bamboo exact")]["note"]
    assert 0 < rows[(1, "bamboo predictor 15%, cap k")]["ffn_bytes_per_step"] < dense_ffn  # rank-256 predictors: big here
    assert len(data["commands"]) == 2 and png.exists() == has_matplotlib


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
    rows = {(r["part"], r.get("dtype"), r["variant"]): r for r in data["rows"]}
    row_bytes, k = 64 * 2, round(0.15 * 224)  # smoke layer: hidden 64, intermediate 224; bf16
    dense, exact, predictor = (rows[("ffn layer", "bfloat16", v)] for v in ("dense", "exact", "predictor 15%"))
    assert dense["bytes"] == 3 * 224 * row_bytes and exact["bytes"] < dense["bytes"]
    # the kernel skips the down rows whose h is 0: a random predictor's picks are mostly inactive ones
    assert 2 * k * row_bytes < predictor["bytes"] - (16 * 64 + 224 * 16) * 2 < 3 * k * row_bytes
    decode = {r["variant"]: r for r in data["rows"] if r["part"] != "ffn layer"}
    assert decode["exact"]["bytes"] < decode["dense eager"]["bytes"] and "rows read" in decode["exact"]["note"]
    assert decode["dense eager"]["vs_dense"] == 1.0 and all(len(r["round_ms"]) == 1 for r in decode.values())
    assert data["read_bandwidth_bytes_per_s"] > 0 and data["smoke"] is True and data["command"].startswith("python")
    assert {"cpu", "cores", "torch", "load_average", "kernel_built"} <= set(data["facts"])


def test_cpu_decode_floor_reads_rewritten_sites_sparse_and_the_rest_whole():
    from types import SimpleNamespace

    import torch

    from bamboo.graph.site_table import SiteTable
    from benchmarks.common import ffn_modules, forced_k_predictors
    from benchmarks.cpu import step_ffn_reads
    from benchmarks.read_bytes import ffn_inputs, ffn_reads

    model = _tiny_model()
    inputs = ffn_inputs(model, torch.randint(3, 1000, (1, 6), generator=torch.Generator().manual_seed(1)))
    sparse_names = ["model.layers.1.mlp", "model.layers.3.mlp"]

    def compiled(rewritten, crossover_refused=(), graphs=({},)):
        rejected = [SimpleNamespace(module=n, reason="left dense: on this CPU ...") for n in crossover_refused]
        sites = [SimpleNamespace(name=n) for n in rewritten]
        return SimpleNamespace(bamboo_report=SimpleNamespace(graphs=list(graphs), sites=SiteTable(sites, rejected)))

    sparse = {n: inputs[n] for n in sparse_names}
    dense = {n: i for n, i in inputs.items() if n not in sparse_names}
    nbytes, note = step_ffn_reads(compiled(sparse_names, ["model.layers.0.mlp"]), inputs, "exact")
    assert nbytes == ffn_reads(sparse, "exact").bytes + ffn_reads(dense, "dense").bytes
    assert nbytes < ffn_reads(inputs, "dense").bytes
    assert "25% of FFNs left dense by compile" in note and "25% of FFNs not rewritten (see bamboo_report)" in note
    predictors = forced_k_predictors(ffn_modules(model), 0.15, rank=16)
    nbytes, note = step_ffn_reads(compiled(sparse_names), inputs, "predictor", predictors)
    assert nbytes == ffn_reads(sparse, "predictor", predictors=predictors).bytes + ffn_reads(dense, "dense").bytes
    with pytest.raises(RuntimeError, match="run the compiled model first"):
        step_ffn_reads(compiled([], graphs=()), inputs, "exact")
    assert step_ffn_reads(compiled([], list(inputs)), inputs, "exact") == (
        ffn_reads(inputs, "dense").bytes, "100% of FFNs left dense by compile (crossover too low here)")


def _tiny_model(tie=False):
    import torch

    from bamboo.models import BambooConfig, BambooForCausalLM

    torch.manual_seed(0)
    return BambooForCausalLM(BambooConfig.named("tiny", tie_word_embeddings=tie)).eval()


def test_read_bytes_counts_the_rows_each_backend_reads():
    import torch

    from benchmarks.common import ffn_modules, forced_k_predictors, forced_threshold_predictors
    from benchmarks.read_bytes import ffn_inputs, ffn_reads

    model = _tiny_model()
    prompt = torch.randint(3, 1000, (2, 6), generator=torch.Generator().manual_seed(1))
    inputs = ffn_inputs(model, prompt)
    assert list(inputs) == [f"model.layers.{i}.mlp" for i in range(4)] and inputs["model.layers.0.mlp"].x.shape == (2, 128)
    mlp_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".mlp." in n)
    assert ffn_reads(inputs, "dense").bytes == mlp_bytes
    row = 128 * 4  # hidden 128, fp32
    gate_active, product_active = 0, 0
    for item in inputs.values():  # by hand: rows of the gate-active and of the product-active neurons
        g, u = item.mlp.gate_proj(item.x), item.mlp.up_proj(item.x)
        gate_active += int((g > 0).any(0).sum())
        product_active += int(((g > 0) & (u > 0)).any(0).sum())
    gate_bytes = 4 * 448 * row
    assert ffn_reads(inputs, "exact").bytes == gate_bytes + (gate_active + product_active) * row
    assert ffn_reads(inputs, "exact", backend="ort").bytes == gate_bytes + 2 * gate_active * row
    capped = forced_k_predictors(ffn_modules(model), 0.25)
    reads = ffn_reads(inputs, "predictor", predictors=capped)
    predictor = sum(t.numel() * 4 for p in capped.values() for t in (p.w_in, p.w_out, p.bias))
    assert reads.gate_rows == reads.up_rows == 112 and 0 < reads.down_rows < 112  # random weights: h is often 0
    assert reads.bytes == predictor + int(4 * (2 * 112 + reads.down_rows)) * row
    assert ffn_reads(inputs, "predictor", "ort", capped).bytes == predictor + 4 * 3 * 112 * row
    uncapped = forced_threshold_predictors(capped, inputs)
    assert all(p.top_k == 0 for p in uncapped.values())
    assert ffn_reads(inputs, "predictor", predictors=uncapped).gate_rows == 112  # the threshold passes k here


@pytest.mark.parametrize("tie", [False, True])
def test_outside_ffn_bytes_skip_the_input_embedding_unless_it_is_the_lm_head(tie):
    from benchmarks.read_bytes import kv_cache_bytes, outside_ffn_bytes

    model = _tiny_model(tie)
    embedding = model.model.embed_tokens.weight
    rest = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if ".mlp." not in n and p is not embedding)
    assert outside_ffn_bytes(model) == rest + (embedding.numel() * 4 if tie else 0)
    # keys and values, 4 layers, 2 KV heads of 32 dims, 3 batch rows, 40 slots, bf16
    assert kv_cache_bytes(model.config, 3, 40, 2) == 2 * 4 * 3 * 2 * 40 * 32 * 2


@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter")
def test_ffn_kernel_smoke_run_writes_every_row(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    from benchmarks import ffn_kernel

    out = tmp_path / "ffn.json"
    monkeypatch.setattr(sys, "argv", ["ffn_kernel.py", "--smoke", "--batches", "1", "--fractions", "0.25",
                                      "--layers", "1", "--reps", "1", "--json", str(out)])
    monkeypatch.setattr(ffn_kernel, "HIDDEN", ffn_kernel.HIDDEN)  # main() shrinks the shapes: undo after the test
    monkeypatch.setattr(ffn_kernel, "INTERMEDIATE", ffn_kernel.INTERMEDIATE)
    monkeypatch.setattr(ffn_kernel, "RANK", ffn_kernel.RANK)
    monkeypatch.setattr(ffn_kernel, "DEVICE", ffn_kernel.DEVICE)
    monkeypatch.setattr(ffn_kernel, "timer", ffn_kernel.timer)
    ffn_kernel.main()
    data = json.loads(out.read_text())
    assert [(r["variant"], r["label"].split(";")[0]) for r in data["results"]] == [
        ("dense", ""), ("exact", "gate 50% active"), ("exact", "fixed grid"), ("gather", ""),
        ("predictor", "forced k, cap k"), ("predictor", "forced k, threshold only"),
        ("predictor", "forced k, fixed grid, cap k"), ("predictor", "forced k, fixed grid, threshold only")]
    dense, exact, exact_fixed, gather, *predictor = data["results"]
    row = 64 * 2
    assert dense["bytes"] == 3 * 448 * row and gather["bytes"] == 3 * 112 * row
    assert exact["bytes"] == exact_fixed["bytes"] < dense["bytes"]
    assert len({p["bytes"] for p in predictor}) == 1  # the same 112 neurons however they are selected
    assert predictor[0]["bytes"] < 2 * 112 * row + (16 * 64 + 448 * 16) * 2 + 112 * row  # h == 0 down rows unread
    assert data["smoke"] is True and all(r["floor_ms"] is None for r in data["results"])
