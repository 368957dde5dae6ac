"""`bamboo demo`: the tiny Bamboo model end to end on a CPU: generate, profile FFN sparsity, find the FFN sites,
compile in exact mode and show what it saved."""
from __future__ import annotations

import time

import torch

import bamboo
from bamboo.calibrate import format_sparsity_table, measure_ffn_sparsity
from bamboo.graph.site_table import format_table
from bamboo.kernels import cpu_crossover
from bamboo.models import BambooForCausalLM
from bamboo.ops import count_weight_reads

PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"


def _tokenizer():
    try:
        from bamboo.models.tokenizer import BambooTokenizer

        return BambooTokenizer()
    except bamboo.BambooError as exc:
        print(f"(no tokenizer: {exc}; using random token ids)")
        return None


def run_demo(config: str = "tiny", new_tokens: int = 16, batches: int = 8, seq_len: int = 64, seed: int = 0,
             trained_model: bool = True) -> dict:
    # The demo's models are small: on a CPU their FFNs run faster dense, so bamboo.compile would keep them dense
    # (reported) and the op would pick its dense path. The demo forces the sparse path to show what it computes
    # and reads; benchmarks/cpu.py measures what pays.
    with cpu_crossover.forced(1.0):
        return _run_demo(config, new_tokens, batches, seq_len, seed, trained_model)


def _run_demo(config, new_tokens, batches, seq_len, seed, trained_model) -> dict:
    torch.manual_seed(seed)
    model = BambooForCausalLM.from_config(config, seed=seed).eval()
    cfg = model.config
    print(f"bamboo {bamboo.__version__} demo: Bamboo '{config}' config, {model.num_parameters() / 1e6:.1f}M parameters, "
          f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, FFN {cfg.intermediate_size} (random weights)\n")

    tokenizer = _tokenizer()
    if tokenizer is not None:
        prompt = tokenizer([PROMPT])["input_ids"]
    else:
        prompt = torch.randint(3, cfg.vocab_size, (1, 12))
    start = time.perf_counter()
    output = model.generate(prompt, max_new_tokens=new_tokens, eos_token_id=None)
    elapsed = time.perf_counter() - start
    new = output[0, prompt.shape[1]:]
    text = tokenizer.decode(new) if tokenizer is not None else str(new.tolist())
    print(f"generated {new_tokens} tokens in {elapsed:.2f}s (static KV cache, eager): {text!r}")
    print("(random weights, so the text is noise; the point is the machinery)\n")

    data = [torch.randint(3, cfg.vocab_size, (2, seq_len)) for _ in range(batches)]
    sparsity = measure_ffn_sparsity(model, data)
    print("\nFFN activation sparsity per layer (share of exact zeros):")
    print(format_sparsity_table(sparsity) + "\n")

    example = torch.randint(3, cfg.vocab_size, (2, 16))
    sites = bamboo.inspect(model, (example,))
    print(f"FFN sites found by the compiler ({len(sites)}):")
    print(f"{sites}\n")

    compiled = bamboo.compile(model, backend="eager", sparsity="exact")
    rows, worst = [], 0.0
    with torch.no_grad():
        # One token per row is the decode step, where sparsity pays; a long prompt activates nearly every neuron.
        for batch, seq in ((1, 1), (4, 1), (16, 1), (1, 16), (2, 64)):
            ids = torch.randint(3, cfg.vocab_size, (batch, seq))
            dense = model(ids)
            with count_weight_reads() as traffic:
                sparse = compiled(ids)
            diff = ((sparse - dense).abs().max() / dense.abs().max()).item()
            worst = max(worst, diff)
            rows.append([f"{batch}x{seq}", f"{diff:.1e}", f"{traffic.skipped_fraction:.1%}"])
    print("bamboo.compile(model, sparsity='exact') against the dense model:")
    print(format_table(["batch x seq", "max rel. diff", "FFN weight bytes not read"], rows))
    print(f"\nlargest relative difference from dense: {worst:.1e} (exact mode: only rounding order differs)")
    print("(the sparse path forced for the demo: on a CPU, bamboo.compile leaves FFNs this small dense, and says so in "
          "its report, because the sparse op cannot beat them there)")
    trained = run_trained_section(tokenizer, new_tokens) if trained_model else None
    return {"sparsity": sparsity, "sites": sites, "max_rel_diff": worst, "trained": trained}


def run_trained_section(tokenizer, new_tokens: int) -> dict:
    """The same on austen-small, the dReLU Bamboo bamboo trained on Jane Austen: real activation sparsity."""
    from bamboo.calibrate.corpus import load_processed, sequential_batches
    from bamboo.models import pretrained_path

    model = BambooForCausalLM.from_pretrained(pretrained_path("austen-small"), dtype=torch.float32)
    print(f"\n--- austen-small: {model.num_parameters() / 1e6:.1f}M parameters, trained by bamboo on five Austen "
          "novels (examples/train_small_bamboo.py) ---")
    _, valid, _ = load_processed()
    sparsity = measure_ffn_sparsity(model, list(sequential_batches(valid, 2, 128, limit=2)), progress=False)
    print("FFN activation sparsity on held-out text (Persuasion):")
    print(format_sparsity_table(sparsity))
    compiled = bamboo.compile(model, sparsity="exact")
    prompt = tokenizer([PROMPT])["input_ids"] if tokenizer is not None else valid[:16][None]
    with count_weight_reads() as traffic:
        output = compiled.generate(prompt, max_new_tokens=new_tokens, eos_token_id=None)
    text = tokenizer.decode(output[0, prompt.shape[1]:]) if tokenizer is not None else str(output[0].tolist())
    print(f"exact-mode generation: {text!r}")
    print(f"FFN weight bytes exact mode did not read while generating: {traffic.skipped_fraction:.1%}")
    return {"sparsity": sparsity, "skipped_fraction": traffic.skipped_fraction}
