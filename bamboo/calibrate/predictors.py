"""Per-layer activation predictors (Deja Vu / PowerInfer style): score = relu(x W_in^T) W_out^T + b, a neuron
is computed when its score exceeds the layer's threshold. Saved as safetensors with metadata that ties them
to the model they were calibrated for (sizes and a fingerprint of each layer's gate weight)."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bamboo.errors import InputError
from bamboo.ops.bound_weights import BoundPredictor, WeightMemo
from bamboo.outputs import prepare_output

FORMAT = "bamboo-predictors-v1"


def fingerprint(gate_weight: torch.Tensor) -> str:
    """A short hash of a strided sample of the gate weight, rounded to bf16 so that the same model loaded in
    fp32, fp16 or bf16 gives the same fingerprint (to about bf16 precision)."""
    flat = gate_weight.detach().reshape(-1)
    step = max(1, flat.numel() // 4096)
    sample = flat[::step][:4096].float().cpu().to(torch.bfloat16).float()
    digest = hashlib.sha256(sample.numpy().tobytes() + str(tuple(gate_weight.shape)).encode()).hexdigest()
    return digest[:16]


@dataclass
class LayerPredictor:
    module: str
    w_in: torch.Tensor       # [rank, hidden]
    w_out: torch.Tensor      # [intermediate, rank]
    bias: torch.Tensor       # [intermediate]
    threshold: float
    fingerprint: str
    top_k: int = 0           # 0: no cap
    stats: dict = field(default_factory=dict)  # recall, precision, density measured on held-out tokens

    @property
    def rank(self) -> int:
        return self.w_in.shape[0]

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 scores [rows, intermediate], exactly as bamboo::sparse_ffn computes them."""
        from bamboo.ops.sparse_ffn import predictor_scores

        return predictor_scores(x, self.w_in, self.w_out, self.bias)

    def check(self) -> "LayerPredictor":
        """Refuse a predictor that would silently pick the wrong neurons: NaN weights make every score comparison
        false (no neuron computed); a threshold that is not a number fails deep inside the compiler."""
        where = f"predictor for {self.module!r}"
        fix = "the file is damaged or was edited: re-run `bamboo calibrate`"
        number = isinstance(self.threshold, (int, float)) and not isinstance(self.threshold, bool)
        if not number or math.isnan(self.threshold):
            raise InputError(f"{where} has threshold {self.threshold!r}, which is not a number; {fix}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise InputError(f"{where} has cap top_k={self.top_k!r}; it must be an integer >= 0; {fix}")
        tensors = {"w_in": self.w_in, "w_out": self.w_out, "bias": self.bias}
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise InputError(f"{where}: {name} is not a floating-point tensor; {fix}")
        if self.w_in.dim() != 2 or self.w_out.dim() != 2 or self.w_out.shape[1] != self.w_in.shape[0] \
                or tuple(self.bias.shape) != (self.w_out.shape[0],):
            raise InputError(f"{where} has inconsistent shapes w_in {tuple(self.w_in.shape)}, w_out "
                             f"{tuple(self.w_out.shape)}, bias {tuple(self.bias.shape)}; {fix}")
        for name, t in tensors.items():
            if t.device.type != "meta" and not bool(torch.isfinite(t).all()):
                raise InputError(f"{where} has NaN or infinite values in {name}: it would compute no neurons (or "
                                 f"all); {fix}")
        return self

    def to(self, dtype=None, device=None) -> "LayerPredictor":
        move = lambda t: t.to(dtype=dtype, device=device)  # noqa: E731
        return LayerPredictor(self.module, move(self.w_in), move(self.w_out), move(self.bias), self.threshold,
                              self.fingerprint, self.top_k, dict(self.stats))


class Predictors(dict):
    """module path -> LayerPredictor, plus calibration metadata; `str()` gives the per-layer table."""

    def __init__(self, layers=(), meta=None):
        super().__init__((p.module, p) for p in layers)
        self.meta = dict(meta or {})

    def save(self, path: str | Path) -> None:
        tensors, layers = {}, []
        for i, p in enumerate(self.values()):
            tensors.update({f"{i}.w_in": p.w_in.contiguous(), f"{i}.w_out": p.w_out.contiguous(),
                            f"{i}.bias": p.bias.contiguous()})
            layers.append({"module": p.module, "threshold": p.threshold, "fingerprint": p.fingerprint,
                           "top_k": p.top_k, "stats": p.stats})
        header = {"format": FORMAT, "meta": self.meta, "layers": layers}
        path = prepare_output(path, "predictor file")
        try:
            save_file(tensors, str(path), metadata={"bamboo": json.dumps(header)})
        except Exception as exc:  # safetensors raises its own error type for I/O failures
            raise InputError(f"writing the predictor file {path} failed ({exc}); choose a writable path") from None

    @classmethod
    def load(cls, path: str | Path) -> "Predictors":
        path = Path(path)
        if not path.is_file():
            raise InputError(f"predictor file {path} does not exist; create one with `bamboo calibrate`")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                header = json.loads(metadata.get("bamboo", "{}"))
                if header.get("format") != FORMAT:
                    raise InputError(f"{path} is not a bamboo predictor file (no '{FORMAT}' metadata); create one "
                                     "with `bamboo calibrate`")
                layers = [LayerPredictor(entry["module"], f.get_tensor(f"{i}.w_in"), f.get_tensor(f"{i}.w_out"),
                                         f.get_tensor(f"{i}.bias"), entry["threshold"], entry["fingerprint"],
                                         entry.get("top_k", 0), entry.get("stats", {}))
                          for i, entry in enumerate(header["layers"])]
                for layer in layers:
                    layer.check()
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{path} could not be read as a predictor file ({exc}); re-run `bamboo calibrate`") from None
        return cls(layers, header.get("meta"))

    def check(self) -> "Predictors":
        """Every layer's LayerPredictor.check (NaN weights, a threshold that is not a number, bad shapes)."""
        for p in self.values():
            p.check()
        return self

    def find(self, module: str) -> LayerPredictor | None:
        """The predictor for the FFN at `module`. A model wrapped in another module (the ONNX decode step, a user's
        wrapper) sees its FFNs under a longer path: the predictor whose path is the longest ending of it matches
        (the fingerprint check in check_fits still refuses one calibrated for other weights)."""
        if module in self:
            return self[module]
        matches = [name for name in self if module.endswith("." + name)]
        return self[max(matches, key=len)] if matches else None

    def check_fits(self, module: str, gate_weight: torch.Tensor) -> LayerPredictor:
        """The predictor for the FFN at `module`, after checking it was calibrated for this gate weight."""
        p = self.find(module)
        if p is None:
            raise InputError(f"no predictor for the FFN at {module!r} (predictors cover {sorted(self)[:4]}...): "
                             "these predictors belong to another model; run `bamboo calibrate` for this one")
        if tuple(p.w_out.shape[:1]) != (gate_weight.shape[0],) or p.w_in.shape[1] != gate_weight.shape[1]:
            raise InputError(f"predictor for {module!r} is sized for hidden {p.w_in.shape[1]} / intermediate "
                             f"{p.w_out.shape[0]} but the FFN has {gate_weight.shape[1]} / {gate_weight.shape[0]}: "
                             "these predictors belong to another model; run `bamboo calibrate` for this one")
        p.check()
        if gate_weight.device.type == "meta":
            raise InputError(f"the FFN at {module!r} has no weight values (meta device): predictors are checked "
                             "against the weights; load the model's weights first")
        if fingerprint(gate_weight) != p.fingerprint:
            raise InputError(f"predictor for {module!r} was calibrated for different weights (gate fingerprint "
                             f"{p.fingerprint}, this model {fingerprint(gate_weight)}): these predictors belong "
                             "to another model; run `bamboo calibrate` for this one")
        return p

    def __str__(self) -> str:
        from bamboo.graph.site_table import format_table

        rows = [[p.module, p.rank, f"{p.threshold:.3f}", p.top_k or "-", f"{p.stats.get('recall', float('nan')):.3f}",
                 f"{p.stats.get('precision', float('nan')):.3f}", f"{p.stats.get('density', float('nan')):.1%}",
                 f"{p.stats.get('true_density', float('nan')):.1%}"] for p in self.values()]
        return format_table(["layer", "rank", "threshold", "cap", "recall", "precision", "predicted active",
                             "actually active"], rows)

    __repr__ = __str__

    def to_json(self) -> dict:
        return {"meta": self.meta, "layers": [{"module": p.module, "rank": p.rank, "threshold": p.threshold,
                                               "top_k": p.top_k, **p.stats} for p in self.values()]}

    def digest(self) -> str:
        """A hash of everything that decides the selection (tensors, thresholds, caps): a cache key."""
        h = hashlib.sha256()
        for p in self.values():
            h.update(f"{p.module}:{p.fingerprint}:{p.threshold!r}:{p.top_k}".encode())
            for t in (p.w_in, p.w_out, p.bias):
                h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:32]

    def summary(self) -> dict:
        stats = [p.stats for p in self.values()]
        mean = lambda key: sum(s.get(key, 0.0) for s in stats) / max(len(stats), 1)  # noqa: E731
        return {"recall": mean("recall"), "precision": mean("precision"), "density": mean("density"),
                "true_density": mean("true_density")}


class PredictorBinder:
    """Binds predictors to the gate weights they were calibrated for, by fingerprint: what a compiled graph
    serving several layers needs, since the gate weight passed in is the only thing that says which layer is
    running (bamboo/ops/bound_weights.py). Each gate weight is fingerprinted once (the match is kept while the
    weight lives unchanged) and its predictor cast to the weight's dtype and device."""

    def __init__(self, predictors: Predictors):
        self.predictors = predictors
        self.by_fingerprint: dict[str, list[LayerPredictor]] = {}
        for p in predictors.values():
            self.by_fingerprint.setdefault(p.fingerprint, []).append(p)
        self._memo = WeightMemo(cache_unversioned=True)
        self.matched: set[str] = set()  # modules of the predictors bound so far

    def find(self, gate_weight: torch.Tensor, module: str | None = None) -> LayerPredictor:
        """The predictor calibrated for this gate weight; `module` (the FFN's path, when known) settles the
        case of one gate weight shared by several FFNs."""
        shape = tuple(gate_weight.shape)
        fp = fingerprint(gate_weight)
        matches = [p for p in self.by_fingerprint.get(fp, []) if (p.w_out.shape[0], p.w_in.shape[1]) == shape]
        where = f"the FFN at {module!r}" if module else f"an FFN with a gate weight of shape {list(shape)}"
        if not matches:
            raise InputError(f"no predictor was calibrated for {where} (gate fingerprint {fp}; the predictors cover "
                             f"{sorted(self.predictors)[:4]}...): these predictors belong to another model or to "
                             "other weights; run `bamboo calibrate` for this one")
        if len(matches) > 1 and module is not None:
            named = [p for p in matches if p.module == module or module.endswith("." + p.module)]
            matches = named or matches
        if len(matches) > 1:
            raise InputError(f"predictors for {[p.module for p in matches]} were all calibrated for one shared gate "
                             f"weight, so a compiled graph cannot tell which applies to {where}; calibrate FFNs "
                             "with shared weights as one, or export the model (bamboo.export keeps each site's own)")
        return matches[0]

    def __call__(self, gate_weight: torch.Tensor, module: str | None = None) -> BoundPredictor:
        def bind(weight):
            p = self.find(weight, module)
            self.matched.add(p.module)
            move = lambda t: t.detach().to(dtype=weight.dtype, device=weight.device).contiguous()  # noqa: E731
            return BoundPredictor(move(p.w_in), move(p.w_out), move(p.bias), float(p.threshold), int(p.top_k))

        return self._memo.get(gate_weight, bind, (str(gate_weight.device), module))
