"""bamboo::sparse_ffn on CPU tensors: registered against the op from here (its meaning stays in bamboo/ops).

The kernel (kernels/cpu/sparse_ffn.cpp) reads only the selected rows of the weights in place: exact mode fuses
the dense gate GEMV with the zero test, then runs a gather-GEMV over the active up rows and an axpy over their
neuron-major down rows; predictor mode scores with the reference's own torch code (`predictor_scores`), selects
with the reference's rule in C++ (`select_neurons`, as `predictor_selection`: threshold, NaN as +inf, cap by score
with ties by index) and runs the gather-GEMV over the gate and up rows of the selected neurons, then the axpy.
bf16 and fp32, fp32 accumulation, 1-16 rows looped inside, OpenMP threads via at::parallel_for (torch's own pool
and thread count).

Route: one C++ source shipped in the package and compiled just in time with torch.utils.cpp_extension.load
(kernels/cpu_build.py; once per machine, cached), because
- a build-time extension would make `pip install -e .` import torch inside pip's isolated build environment (a
  multi-GB download of the CUDA build on a plain Linux machine) and tie the wheel to one torch ABI; the CI runs
  a plain `pip install -e '.[test]'`;
- Inductor's C++ codegen does not emit this kernel: a data-dependent active list drives the reads, and its
  indirect-indexing loops would be recompiled per shape without the row-blocking and the column-sliced axpy;
- -march=native gets the machine's vector units (AVX2/FMA here) with no dispatch code of our own; bf16 is
  widened by a 16-bit shift, which vectorises (c10::BFloat16's conversion does not).
Where it cannot build, bamboo warns once and the op runs its torch reference.

Never slower than dense: rows above PREDICTOR_MAX_ROWS (prefill) and shares of active neurons above the measured
crossover (kernels/cpu_crossover.py) run the dense FFN; exact mode decides after its gate, which it then reuses.
fp16, fp64 and weights whose rows are not contiguous run the reference.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from bamboo.kernels import cpu_build, cpu_crossover
from bamboo.ops import activations
from bamboo.ops.bound_weights import neuron_major_rows
from bamboo.ops.sparse_ffn import (
    PREDICTOR_MAX_ROWS,
    _nbytes,
    _record,
    check_arguments,
    predictor_scores,
    reference_sparse_ffn,
    resolve_predictor,
)

_op_module = sys.modules["bamboo.ops.sparse_ffn"]  # the module (bamboo.ops.sparse_ffn names the op itself)
DTYPES = (torch.float32, torch.bfloat16)
# Fixed in kernels/cpu/sparse_ffn.cpp (activate()).
ACT_CODES = {"identity": 0, "relu": 1, "silu": 2, "gelu": 3, "gelu_tanh": 4, "sigmoid": 5, "tanh": 6}


def supports(x, gate_weight, up_weight, down_rows, *biases) -> bool:
    """The kernel's reach: fp32/bf16, rows of every weight contiguous (views of a stacked parameter are fine),
    biases in the input's dtype (the kernel reads them as such; the reference says what is wrong otherwise)."""
    return (x.dtype in DTYPES and x.numel() > 0 and down_rows.shape[1] > 0
            and all(w is None or w.stride(-1) == 1 for w in (gate_weight, up_weight, down_rows))
            and all(b is None or (b.dtype == x.dtype and b.dim() == 1) for b in biases))


@torch.library.register_kernel("bamboo::sparse_ffn", "cpu")
def sparse_ffn_cpu(x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_weight_nm, down_bias,
                   predictor_in, predictor_out, predictor_bias, kind, mode, up_act, threshold, top_k,
                   predictor_table=0):
    check_arguments(x, gate_weight, up_weight, down_weight, down_weight_nm, kind, mode, up_act, predictor_in,
                    predictor_out, predictor_table)
    reference = (x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_weight_nm, down_bias,
                 predictor_in, predictor_out, predictor_bias, kind)
    x2 = x.reshape(-1, x.shape[-1])
    rows = x2.shape[0]
    if mode == "dense" or rows > PREDICTOR_MAX_ROWS:  # prefill: the union of rows covers nearly every neuron
        return reference_sparse_ffn(*reference, "dense", up_act)
    down_rows = down_weight_nm if down_weight_nm is not None else neuron_major_rows(down_weight)
    if not (supports(x2, gate_weight, up_weight, down_rows, gate_bias, up_bias, down_bias) and cpu_build.available()):
        return reference_sparse_ffn(*reference, mode, up_act, threshold, top_k, predictor_table)
    intermediate = gate_weight.shape[0]
    ffn_bytes = _nbytes(gate_weight) + _nbytes(up_weight) + _nbytes(down_rows)
    limit = cpu_crossover.crossover(x.dtype, rows, ffn_bytes, mode)
    if limit <= 0.0:  # sparse is slower at any share here (small FFNs: predictor mode's fixed costs dominate)
        return reference_sparse_ffn(*reference, "dense", up_act)
    ids = None
    if mode == "predictor":
        predictor_in, predictor_out, predictor_bias, threshold, top_k = resolve_predictor(
            gate_weight, predictor_in, predictor_out, predictor_bias, threshold, top_k, predictor_table)
        scores = predictor_scores(x2, predictor_in, predictor_out, predictor_bias)  # as the reference computes them
        ids = torch.ops.bamboo_cpu.select_neurons(scores, float(threshold), int(top_k))  # and selects, in C++
        if ids.numel() > limit * intermediate:
            return reference_sparse_ffn(*reference, "dense", up_act)
    act = ACT_CODES["identity" if kind == "relu_mlp" else up_act]
    y, gate_pre, counts = torch.ops.bamboo_cpu.sparse_ffn(
        x2.contiguous(), gate_weight, _flat(gate_bias), up_weight, _flat(up_bias), down_rows, _flat(down_bias), ids,
        act, kind == "drelu" and mode == "exact", limit)
    if y.numel() == 0:  # exact mode above the crossover: finish densely from the gate it computed
        down = down_weight if down_weight is not None else down_rows.t()
        y = _dense_from_gate(x2, gate_pre, up_weight, up_bias, down, down_bias, kind, up_act)
        counts = (intermediate, intermediate)
    if _op_module._traffic is not None:  # inside count_weight_reads()
        _record_traffic(gate_weight, up_weight, down_rows, predictor_in, predictor_out, mode, counts)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _flat(t):
    return None if t is None else t.contiguous()


def _dense_from_gate(x2, gate_pre, up_weight, up_bias, down_weight, down_bias, kind, up_act):
    h = torch.relu(gate_pre).to(x2.dtype)
    if kind != "relu_mlp":
        h = h * activations.apply(up_act, F.linear(x2, up_weight, up_bias))
    return F.linear(h, down_weight, down_bias)


def _record_traffic(gate_weight, up_weight, down_rows, predictor_in, predictor_out, mode, counts):
    """The weight bytes read, for count_weight_reads (as the reference reports its own)."""
    chosen, kept = (int(c) for c in counts)
    rows = gate_weight.shape[0]
    per = lambda w, n: _nbytes(w) * n // max(rows, 1)  # noqa: E731
    dense = _nbytes(gate_weight) + _nbytes(up_weight) + _nbytes(down_rows)
    if mode == "predictor":
        read = _nbytes(predictor_in) + _nbytes(predictor_out) + per(gate_weight, chosen) + per(up_weight, chosen) \
            + per(down_rows, chosen)
    else:
        read = _nbytes(gate_weight) + per(up_weight, chosen) + per(down_rows, kept)
    _record(dense, read)
