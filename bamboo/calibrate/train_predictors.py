"""bamboo.calibrate: stream per-layer FFN inputs through the model, train one low-rank predictor per FFN site
(class-weighted BCE on "this neuron's product is nonzero"), and pick each layer's threshold for a target recall
on held-out batches. Memory stays bounded: predictors learn online from each batch, and threshold selection
keeps a fixed-size sample of scores."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bamboo.calibrate.predictors import LayerPredictor, Predictors, fingerprint
from bamboo.errors import InputError
from bamboo.graph.capture import adapted, export_program
from bamboo.ops import activations
from bamboo.ops.sparse_ffn import predictor_scores
from bamboo.passes.detect_ffn_sites import FFNSite, detect_ffn_sites


@dataclass
class SiteWeights:
    site: FFNSite
    gate_weight: torch.Tensor
    gate_bias: torch.Tensor | None
    up_weight: torch.Tensor | None
    up_bias: torch.Tensor | None


def _resolve(model, program, node, layout="out_in", rows=None):
    """The model's tensor behind a weight (or bias) node of the program, as [out, in]; `rows` (start, stop) takes
    one part of a fused projection (gate_up: gate and up are row ranges of one weight and one bias)."""
    if node is None:
        return None
    signature = program.graph_signature
    name = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}.get(node.name)
    if name is None:
        raise InputError(f"FFN weight {node.name} is not a parameter or buffer of the model: calibrate needs its "
                         "FFN weights stored in the model")
    owner, _, attr = name.rpartition(".")
    tensor = getattr(model.get_submodule(owner) if owner else model, attr).detach()
    tensor = tensor.t() if layout == "in_out" else tensor
    return tensor[rows[0]:rows[1]] if rows is not None else tensor


def _gate_weight(model, program, site: FFNSite):
    gate = site.match.gate
    return _resolve(model, program, gate.weight, gate.layout, gate.rows)


def ffn_sites_with_weights(model, example) -> list[SiteWeights]:
    with adapted(model, {}, "export") as kwargs:  # a transformers model: caches off for torch.export
        program = export_program(model, example if isinstance(example, tuple) else (example,), kwargs, dynamic=False)
    report = detect_ffn_sites(program.graph)
    if not report.sites:
        raise InputError(f"{type(model).__name__} has no ReLU-sparse FFN to calibrate predictors for")
    out = []
    for site in report.sites:
        if site.expert is not None:
            raise InputError(f"the FFN at {site.name} is one expert of stacked expert weights (fused MoE experts): "
                             "calibrate learns from each FFN module's input and cannot see the tokens routed to one "
                             "expert, so predictor mode does not cover these experts yet; use sparsity='exact'")
        m = site.match
        out.append(SiteWeights(site, _gate_weight(model, program, site),
                               _resolve(model, program, m.gate.bias, rows=m.gate.rows),
                               _resolve(model, program, m.up.weight, m.up.layout, m.up.rows) if m.up else None,
                               _resolve(model, program, m.up.bias, rows=m.up.rows) if m.up else None))
    return out


def predictors_for_sites(model, program, sites: list[FFNSite], predictors: Predictors) -> list[LayerPredictor]:
    """Each site's predictor, checked against the site's gate weight as compile checks it."""
    return [predictors.check_fits(site.module, _gate_weight(model, program, site)) for site in sites]


class _Reservoir:
    """A bounded uniform sample of a stream of values."""

    def __init__(self, capacity: int, generator: torch.Generator):
        self.capacity, self.generator, self.values, self.seen = capacity, generator, torch.empty(0), 0

    def add(self, values: torch.Tensor) -> None:
        values = values.detach().float().cpu().reshape(-1)
        self.seen += values.numel()
        merged = torch.cat([self.values, values])
        if merged.numel() > self.capacity:
            keep = torch.randperm(merged.numel(), generator=self.generator)[: self.capacity]
            merged = merged[keep]
        self.values = merged


class _LayerCalibration:
    def __init__(self, weights: SiteWeights, rank: int, lr: float, max_scores: int, seed: int,
                 existing: LayerPredictor | None = None):
        self.w = weights
        site = weights.site
        hidden, intermediate = site.hidden_size, site.intermediate_size
        device = weights.gate_weight.device
        gen = torch.Generator().manual_seed(seed)
        if existing is not None:  # re-threshold a trained predictor
            self.w_in = existing.w_in.float().to(device).clone().requires_grad_()
            self.w_out = existing.w_out.float().to(device).clone().requires_grad_()
            self.bias = existing.bias.float().to(device).clone().requires_grad_()
        else:
            self.w_in = (torch.randn(rank, hidden, generator=gen) / hidden**0.5).to(device).requires_grad_()
            self.w_out = (torch.randn(intermediate, rank, generator=gen) / rank**0.5).to(device).requires_grad_()
            self.bias = torch.zeros(intermediate, device=device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.w_in, self.w_out, self.bias], lr=lr)
        self.positives = _Reservoir(max_scores, gen)
        self.all_scores = _Reservoir(max_scores, gen)
        self.true_active = 0
        self.pairs = 0

    def labels(self, x: torch.Tensor) -> torch.Tensor:
        w, kind = self.w, self.w.site.kind
        gate = F.linear(x, w.gate_weight.float(), None if w.gate_bias is None else w.gate_bias.float()) > 0
        if kind == "relu_mlp":
            return gate
        up = F.linear(x, w.up_weight.float(), None if w.up_bias is None else w.up_bias.float())
        return gate & (activations.apply(self.w.site.up_act, up) != 0)

    def scores(self, x):
        return predictor_scores(x, self.w_in, self.w_out, self.bias)

    def step(self, x: torch.Tensor, minibatch: int = 256) -> float:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        y = self.labels(x).float()
        positive = y.mean().clamp(1e-4, 1 - 1e-4)
        pos_weight = ((1 - positive) / positive).clamp(1.0, 10.0)
        loss_value = 0.0
        with torch.enable_grad():
            for start in range(0, x.shape[0], minibatch):
                logits = self.scores(x[start:start + minibatch])
                loss = F.binary_cross_entropy_with_logits(logits, y[start:start + minibatch], pos_weight=pos_weight)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                loss_value = loss.item()
        return loss_value

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        y = self.labels(x)
        s = self.scores(x)
        self.positives.add(s[y])
        self.all_scores.add(s)
        self.true_active += int(y.sum())
        self.pairs += y.numel()

    def finish(self, target_recall: float) -> LayerPredictor:
        if self.positives.values.numel() == 0:
            threshold = float("inf")
            recall = 1.0
        else:
            threshold = torch.quantile(self.positives.values, 1.0 - target_recall).item()
            recall = (self.positives.values >= threshold).float().mean().item()
        density = (self.all_scores.values >= threshold).float().mean().item()
        true_density = self.true_active / max(self.pairs, 1)
        precision = recall * true_density / density if density > 0 else 1.0
        # the op selects scores strictly above the threshold: step just below the quantile
        threshold = math.nextafter(threshold, -math.inf) if math.isfinite(threshold) else threshold
        site = self.w.site
        return LayerPredictor(site.module, self.w_in.detach().clone(), self.w_out.detach().clone(),
                              self.bias.detach().clone(), threshold, fingerprint(self.w.gate_weight),
                              stats={"recall": recall, "precision": precision, "density": density,
                                     "true_density": true_density, "kind": site.kind})


def _stream(model, by_module: dict, train: list, heldout: list, epochs: int, progress: bool) -> None:
    """Run the batches with hooks on the FFN modules: train on `train`, then observe `heldout`."""
    mode = {"train": True}

    def hook(module_name):
        def pre_hook(module, args):
            x = args[0] if args else None
            for layer in by_module[module_name]:
                if not isinstance(x, torch.Tensor) or x.shape[-1] != layer.w.site.hidden_size:
                    raise InputError(f"cannot capture the FFN input of module {module_name!r}: its first argument is "
                                     "not the FFN input; calibrate needs the FFN in a module of its own")
                layer.step(x) if mode["train"] else layer.observe(x)
        return pre_hook

    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in by_module]
    try:
        for epoch in range(epochs if train else 0):
            for batch in tqdm(train, desc=f"calibrating predictors (epoch {epoch + 1}/{epochs})", disable=not progress):
                _call(model, batch)
        mode["train"] = False
        for batch in tqdm(heldout, desc="choosing thresholds on held-out batches", disable=not progress):
            _call(model, batch)
    finally:
        for h in handles:
            h.remove()


def _layers_by_module(layers) -> dict:
    by_module = {}
    for layer in layers:
        module = layer.w.site.module
        if module is None:
            raise InputError("an FFN site has no module path: calibrate hooks the module that holds the FFN")
        by_module.setdefault(module, []).append(layer)
    return by_module


@torch.no_grad()
def set_thresholds(model: torch.nn.Module, predictors: Predictors, batches, target_recall: float,
                   max_scores: int = 1_000_000, progress: bool = False) -> Predictors:
    """New thresholds for trained predictors: each layer's threshold for `target_recall` on `batches`
    (recall, precision and density re-measured there). The predictors' weights are reused."""
    batches = list(batches)
    sites = ffn_sites_with_weights(model, (batches[0],))
    layers = [_LayerCalibration(s, 0, 0.0, max_scores, i, existing=predictors.check_fits(s.site.module, s.gate_weight))
              for i, s in enumerate(sites)]
    _stream(model, _layers_by_module(layers), [], batches, 0, progress)
    result = []
    for layer, site in zip(layers, sites):
        new = layer.finish(target_recall)
        new.top_k = predictors.find(site.site.module).top_k
        result.append(new)
    return Predictors(result, {**predictors.meta, "target_recall": target_recall})


def _call(model, batch):
    return model(**batch) if isinstance(batch, dict) else model(batch)


@torch.no_grad()
def calibrate(model: torch.nn.Module, batches, rank: int = 64, target_recall: float = 0.99, epochs: int = 2,
              lr: float = 3e-3, holdout: float = 0.2, max_scores: int = 1_000_000, seed: int = 0,
              progress: bool = True) -> Predictors:
    """Train one predictor per FFN site of `model` on `batches` (input-id tensors or kwargs dicts).

    The last `holdout` share of the batches (at least one) is not trained on: it sets each layer's threshold so
    that `target_recall` of the truly active (token, neuron) pairs are predicted, and measures recall,
    precision and the predicted density (share of neurons computed per token).
    """
    for name, value, low in (("rank", rank, 1), ("epochs", epochs, 1), ("max_scores", max_scores, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    if not 0 < holdout < 1:
        raise InputError(f"holdout must be a share in (0, 1), got {holdout!r}")
    batches = list(batches)
    if len(batches) < 2:
        raise InputError("calibrate needs at least 2 batches: one or more to train on and one held out")
    if not 0 < target_recall <= 1:
        raise InputError(f"target_recall must be in (0, 1], got {target_recall}")
    held = max(1, int(round(len(batches) * holdout)))
    train, heldout = batches[:-held], batches[-held:]
    example = batches[0]
    if isinstance(example, dict):
        raise InputError("calibrate finds the FFN sites from a positional batch; pass input-id tensors")
    sites = ffn_sites_with_weights(model, (example,))
    layers = [_LayerCalibration(s, rank, lr, max_scores, seed + i) for i, s in enumerate(sites)]
    by_module = _layers_by_module(layers)

    _stream(model, by_module, train, heldout, epochs, progress)
    predictors = [layer.finish(target_recall) for layer in layers]
    meta = {"rank": rank, "target_recall": target_recall, "epochs": epochs, "layers": len(predictors),
            "train_batches": len(train), "heldout_batches": len(heldout),
            "hidden_size": sites[0].site.hidden_size, "intermediate_size": sites[0].site.intermediate_size}
    return Predictors(predictors, meta)
