"""The CUDA registration of bamboo::sparse_ffn (bamboo/kernels/cuda_sparse_ffn.py): which path a call takes, and
the masked predictor FFN that runs where the Triton kernels cannot (no host sync, so CUDA graphs still capture).
The masked path is plain torch: checked here on the CPU against the reference op, and on a GPU (marked gpu) under
torch's sync debug mode and a CUDA-graph capture."""
import math

import pytest
import torch

from bamboo import kernels
from bamboo.kernels.cuda_sparse_ffn import cuda_path, masked_predictor_ffn
from bamboo.ops.sparse_ffn import reference_sparse_ffn
from tests.kernels.ffn_weights import random_ffn


def _layer(gen, rows, hidden=24, intermediate=96, out=20, rank=8, kind="drelu", bias=True, dtype=torch.float64):
    return random_ffn(gen, rows, hidden, intermediate, out, dtype, bias=bias, kind=kind, rank=rank)


def _both(w, kind, up_act, threshold, top_k):
    ref = reference_sparse_ffn(w["x"], w["gw"], w["gb"], w["uw"], w["ub"], w["dw"], None, w["db"], w["p_in"],
                               w["p_out"], w["p_b"], kind, "predictor", up_act, threshold, top_k)
    got = masked_predictor_ffn(w["x"], w["gw"], w["gb"], w["uw"], w["ub"], w["dw"].t(), w["db"], w["p_in"],
                               w["p_out"], w["p_b"], kind, up_act, threshold, top_k)
    return got, ref


@pytest.mark.parametrize("kind,up_act", [("drelu", "relu"), ("reglu", "identity"), ("reglu", "silu"),
                                         ("relu_mlp", "relu")])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_masked_predictor_ffn_equals_the_reference_op(kind, up_act, rows):
    gen = torch.Generator().manual_seed(rows * 7 + len(kind))
    w = _layer(gen, rows, kind=kind, bias=rows != 3)
    for threshold, top_k in ((-math.inf, 0), (0.0, 0), (-math.inf, 10), (0.0, 5), (0.1, 96), (math.inf, 0)):
        got, ref = _both(w, kind, up_act, threshold, top_k)
        assert got.shape == ref.shape and got.dtype == ref.dtype
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12, msg=f"threshold {threshold}, cap {top_k}")


def test_a_binding_cap_changes_the_output_and_nan_in_a_skipped_neuron_does_not_leak():
    gen = torch.Generator().manual_seed(3)
    w = _layer(gen, 2)
    uncapped, _ = _both(w, "drelu", "relu", -math.inf, 0)
    capped, ref = _both(w, "drelu", "relu", -math.inf, 7)
    assert not torch.allclose(capped, uncapped)  # the cap binds: the test would not notice a mask ignoring it
    torch.testing.assert_close(capped, ref, rtol=1e-12, atol=1e-12)
    # a neuron the predictor drops gets a NaN up row: the reference never computes it, so neither may the mask
    scores = torch.relu(w["x"] @ w["p_in"].t()) @ w["p_out"].t() + w["p_b"]
    dropped = int(scores.amax(0).argmin())
    w["uw"][dropped] = math.nan
    got, ref = _both(w, "drelu", "relu", -math.inf, 7)
    assert not ref.isnan().any()
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    # and a NaN in a selected neuron reaches the output in both
    w["uw"][int(scores.amax(0).argmax())] = math.nan
    got, ref = _both(w, "drelu", "relu", -math.inf, 7)
    assert ref.isnan().all() and got.isnan().all()


@pytest.mark.parametrize("triton_runs", [True, False])
def test_the_path_a_cuda_call_takes(triton_runs, monkeypatch):
    monkeypatch.setattr(kernels, "use_sparse_kernel", lambda x2, act, mode: triton_runs)
    monkeypatch.setenv("BAMBOO_SPARSE_MAX_ROWS", "2")
    one, three, seventeen = (torch.zeros(n, 8) for n in (1, 3, 17))
    sparse = "triton" if triton_runs else None
    assert cuda_path(one, "dense", "relu") == "dense"
    assert cuda_path(one, "exact", "relu") == (sparse or "dense")  # exact without kernels: dense, same values
    assert cuda_path(three, "exact", "relu") == "dense"  # over BAMBOO_SPARSE_MAX_ROWS
    assert cuda_path(three, "predictor", "relu") == (sparse or "masked")
    assert cuda_path(seventeen, "predictor", "relu") == "dense"  # prefill: the reference is dense there too


def test_fp32_is_a_kernel_dtype():
    # fp32 calls used to fall back to the reference (a host sync inside a CUDA graph): the kernels' IEEE dots run it
    assert torch.float32 in kernels.SPARSE_DTYPES


def _op(w, mode, top_k=0):
    return torch.ops.bamboo.sparse_ffn(w["x"], w["gw"], w["gb"], w["uw"], w["ub"], w["dw"], None, w["db"],
                                       w["p_in"] if mode == "predictor" else None,
                                       w["p_out"] if mode == "predictor" else None,
                                       w["p_b"] if mode == "predictor" else None, "drelu", mode, "relu",
                                       -math.inf if mode == "predictor" else 0.0, top_k)


@pytest.mark.gpu
@pytest.mark.parametrize("no_triton, choice", [(False, "compact"), (False, "fixed-grid"), (True, "compact")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_calls_never_sync_and_capture_in_a_cuda_graph(no_triton, choice, dtype, monkeypatch):
    import bamboo  # noqa: F401  (registers the op)

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.setenv("BAMBOO_FFN_KERNELS", choice)
    if no_triton:
        monkeypatch.setattr(kernels, "triton_available", lambda: False)
    gen = torch.Generator().manual_seed(11)
    w = {n: (t.to("cuda", dtype) if t is not None else None)
         for n, t in _layer(gen, 1, hidden=512, intermediate=1536, out=512, rank=64).items()}
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for mode, top_k in (("exact", 0), ("predictor", 0), ("predictor", 200)):
        # the reference on the same device scores with the same torch code, so it selects the same neurons
        ref = reference_sparse_ffn(w["x"], w["gw"], w["gb"], w["uw"], w["ub"], w["dw"], None, w["db"], w["p_in"],
                                   w["p_out"], w["p_b"], "drelu", mode, "relu",
                                   -math.inf if mode == "predictor" else 0.0, top_k).double().cpu()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _op(w, mode, top_k)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())  # the fixed-grid scratch is per layer: never overlap calls
        with torch.cuda.stream(stream):
            _op(w, mode, top_k)
            with torch.cuda.graph(graph):
                out = _op(w, mode, top_k)
        graph.replay()
        torch.cuda.synchronize()
        err = ((out.double().cpu() - ref).norm() / ref.norm()).item()
        assert err < tol, (mode, top_k, err)
