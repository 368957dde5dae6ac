"""What bamboo::sparse_ffn derives from the weights it is called with: the binding rule.

The rule: **the op reads only what is passed in on that call.** With Dynamo's default
(`inline_inbuilt_nn_modules`), parameters are graph inputs without identity guards, so one compiled graph
serves every layer whose forward breaks the graph (a print, an `.item()`, host-side MoE routing): layer 3
runs layer 0's graph with layer 3's weights. Anything computed from weights at compile time and baked into
that graph would silently apply layer 0's values to every layer. So nothing is baked; the op derives what
it needs from the tensors of the call:

- **Neuron-major down rows.** The sparse path reads whole rows of the active neurons, so it wants the down
  projection as [intermediate, out] with contiguous rows. A weight already stored that way (nn.Linear's
  [out, intermediate] with transposed strides, see `store_down_proj_neuron_major`) is read in place. Any
  other is copied once and the copy is memoised against the weight tensor itself: keyed by the tensor's
  identity (the `_base` of a view, so per-call views of one stacked expert parameter share an entry) and
  valid only while its storage pointer, shape, strides and version counter are unchanged, so an in-place
  update (load_state_dict, `copy_`, an optimizer step) is seen at the next call. Not seen: writes through
  `.data` (a separate version counter: run such code under `uncached()`, or compile after it), and weight
  changes between replays of a captured CUDA graph (the graph reads the copy it was captured with).
  Inference tensors have no version counter: they are copied on every call, with one warning.
- **Predictors** (predictor mode in compiled graphs): bound to the gate weight passed in, through a table
  registered per compile (`register_predictor_table`, an id baked into the graph is the only constant, and
  it names the table, not a layer). The table maps a gate weight to that layer's predictor tensors,
  threshold and cap; it is built by the caller (bamboo.compile matches predictors to gate weights by their
  fingerprint), so this layer knows nothing about calibration.

Exported programs (bamboo.export, ONNX, TensorRT) hold each layer's tensors as their own buffers: there is
no graph reuse there, and the file must carry everything it needs.
"""
from __future__ import annotations

import contextlib
import itertools
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from bamboo.errors import InputError

# -- values derived from a weight, kept while the weight lives unchanged -------------------------------------


@dataclass
class _Entry:
    data_ptr: int
    version: Optional[int]
    value: object


def _version(t: Tensor) -> Optional[int]:
    try:
        return t._version
    except RuntimeError:  # inference tensors track no version
        return None


class WeightMemo:
    """Values derived from weight tensors (a neuron-major copy, a matched predictor), each kept as long as its
    weight lives and is unchanged. Keyed by the weight's identity, or by its `_base` for a view (the per-call
    `w.t()` or `w[expert]` of one parameter shares an entry), plus the view's offset, shape and strides; an
    entry is used only while the storage pointer and the version counter are the ones it was made from."""

    def __init__(self, cache_unversioned: bool = False):
        self._entries: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._lock = threading.Lock()
        self.cache_unversioned = cache_unversioned  # inference tensors have no version counter to check

    def get(self, weight: Tensor, derive: Callable[[Tensor], object], extra_key: tuple = ()):
        owner = weight._base if weight._base is not None else weight
        version = _version(owner)
        if getattr(_uncached, "active", False) or (version is None and not self.cache_unversioned):
            return derive(weight)
        key = (weight.storage_offset(), tuple(weight.shape), tuple(weight.stride()), weight.dtype) + extra_key
        with self._lock:
            entries = self._entries.get(owner)
            entry = entries.get(key) if entries is not None else None
            if entry is not None and entry.version == version and entry.data_ptr == owner.data_ptr():
                return entry.value
        value = derive(weight)
        with self._lock:
            self._entries.setdefault(owner, {})[key] = _Entry(owner.data_ptr(), version, value)
        return value


_uncached = threading.local()  # per thread: `active` is set only inside uncached()


@contextlib.contextmanager
def uncached():
    """Derive from the weights afresh on every call inside this block: for code that writes weights through
    `.data` (torch.autograd.gradcheck does), which no version counter sees."""
    previous = getattr(_uncached, "active", False)
    _uncached.active = True
    try:
        yield
    finally:
        _uncached.active = previous


# -- neuron-major down rows -----------------------------------------------------------------------------------

_neuron_major = WeightMemo()
_warned_inference = False


def is_neuron_major(down_weight: Tensor) -> bool:
    """True when an [out, intermediate] weight already has contiguous neuron rows (transposed strides)."""
    return down_weight.dim() == 2 and down_weight.t().is_contiguous()


def neuron_major_rows(down_weight: Tensor) -> Tensor:
    """The down projection [out, intermediate] as [intermediate, out] rows, contiguous, same values."""
    if is_neuron_major(down_weight):
        return down_weight.t()
    if _capturing(down_weight):
        # no allocation inside a CUDA graph capture: read the rows strided (same values, slower)
        return down_weight.t()
    owner = down_weight._base if down_weight._base is not None else down_weight
    if _version(owner) is None:
        _warn_inference_tensor()
    return _neuron_major.get(down_weight, lambda w: w.detach().t().contiguous())


def store_down_proj_neuron_major(weight: torch.nn.Parameter) -> None:
    """Store an [out, intermediate] down weight with neuron-major strides in place (same values and shape):
    the sparse path then reads it without a second copy. Dense matmuls still work, but on a CPU in bf16
    torch's GEMV with such a weight is much slower, so bamboo never does this by itself."""
    with torch.no_grad():
        weight.data = weight.data.t().contiguous().t()


def _capturing(t: Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _warn_inference_tensor() -> None:
    global _warned_inference
    if not _warned_inference:
        _warned_inference = True
        warnings.warn("bamboo: a down projection weight is an inference tensor (created under "
                      "torch.inference_mode), which tracks no version, so its neuron-major copy cannot be kept "
                      "safely and is made on every call. Load the model outside inference_mode, or store the "
                      "weights neuron-major once with bamboo.ops.bound_weights.store_down_proj_neuron_major.",
                      stacklevel=3)


# -- predictors bound to gate weights ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BoundPredictor:
    """One layer's predictor as the op consumes it: tensors in the call's dtype and device."""

    w_in: Tensor
    w_out: Tensor
    bias: Optional[Tensor]
    threshold: float
    top_k: int


# resolve(gate_weight) -> BoundPredictor; raises InputError (naming the fix) when none fits
PredictorResolver = Callable[[Tensor], BoundPredictor]
_tables: dict[int, PredictorResolver] = {}
_table_ids = itertools.count(1)


def register_predictor_table(resolve: PredictorResolver) -> int:
    """Register a table and return its id (what a compiled graph's sparse_ffn nodes carry)."""
    table = next(_table_ids)
    _tables[table] = resolve
    return table


def unregister_predictor_table(table: int) -> None:
    _tables.pop(table, None)


def bound_predictor(table: int, gate_weight: Tensor) -> BoundPredictor:
    resolve = _tables.get(table)
    if resolve is None:
        raise InputError(f"bamboo::sparse_ffn refers to predictor table {table}, which is not registered in this "
                         "process: a compiled model's predictors live as long as the model; compile it again "
                         "(exported programs carry their predictors and need no table)")
    return resolve(gate_weight)
