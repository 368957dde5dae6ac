"""Train the small dReLU Bamboo ("austen-small", 14M parameters) from scratch on Jane Austen's novels.

    python examples/train_small_bamboo.py --out bamboo/models/pretrained/austen-small          # GPU: ~2 min
    python examples/train_small_bamboo.py --steps 40 --batch-size 4 --out /tmp/smoke           # CPU smoke run

AdamW with weight decay, linear warm-up then cosine decay, evaluation on the held-out novel (Persuasion) every
`--eval-every` steps; the checkpoint with the best validation perplexity is kept and training stops once it
has not improved for `--patience` evaluations. The result is saved in bf16 in the Bamboo layout with a model card.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bamboo.calibrate import format_sparsity_table, measure_ffn_sparsity  # noqa: E402
from bamboo.calibrate.corpus import load_processed, random_batches, sequential_batches  # noqa: E402
from bamboo.models import BambooConfig, BambooForCausalLM  # noqa: E402
from bamboo.models.tokenizer import BambooTokenizer  # noqa: E402


@torch.no_grad()
def perplexity(model, tokens, seq_len=256, batch_size=32, device="cpu", limit=None) -> float:
    total, count = 0.0, 0
    for batch in sequential_batches(tokens, batch_size, seq_len, limit):
        batch = batch.to(device)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=device != "cpu"):
            logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bamboo/models/pretrained/austen-small")
    parser.add_argument("--config", default="austen-small")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    train, valid, provenance = load_processed()
    config = BambooConfig.named(args.config)
    model = BambooForCausalLM.from_config(config, seed=args.seed).to(args.device).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(args.steps - args.warmup, 1)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))

    batches = random_batches(train, args.batch_size, args.seq_len + 1, seed=args.seed)
    best, best_state, best_step, stale, history = float("inf"), None, 0, 0, []
    start = time.time()
    progress = tqdm(range(args.steps), desc="training", unit="step")
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        batch = next(batches).to(args.device)
        with torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.device != "cpu"):
            logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            ppl = perplexity(model, valid, args.seq_len, device=args.device)
            model.train()
            history.append({"step": step + 1, "train_loss": loss.item(), "val_ppl": ppl})
            tqdm.write(f"step {step + 1}: train loss {loss.item():.3f}, validation perplexity {ppl:.2f}")
            if ppl < best:
                best, best_step, stale = ppl, step + 1, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                stale += 1
                if stale >= args.patience:
                    tqdm.write(f"validation perplexity has not improved for {stale} evaluations: stopping")
                    break
    elapsed = time.time() - start
    model.load_state_dict(best_state)
    model = model.to(torch.bfloat16).eval()
    bf16_ppl = perplexity(model, valid, args.seq_len, device=args.device)
    sparsity = measure_ffn_sparsity(model, [b.to(args.device) for b in sequential_batches(valid, 16, args.seq_len, 8)],
                                    progress=False)
    out = Path(args.out)
    model.cpu().save_pretrained(out, max_shard_size="15MB")
    BambooTokenizer().save_pretrained(out)  # tokenizer.model + tokenizer_config.json: AutoTokenizer loads it
    card = {
        "config": args.config, "parameters": model.num_parameters(), "data": provenance["source"],
        "chat": False,  # plain text only: the CLI refuses --chat although the ChatML template ships (for transformers)
        "train_tokens": int(train.numel()), "validation": provenance["validation"],
        "validation_tokens": int(valid.numel()), "steps_run": history[-1]["step"], "best_step": best_step,
        "tokens_seen": history[-1]["step"] * args.batch_size * args.seq_len, "seconds": round(elapsed, 1),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "val_ppl_fp32_weights": best, "val_ppl_bf16": bf16_ppl, "hyperparameters": vars(args), "history": history,
        "ffn_sparsity": [{"layer": s.layer, "product_zeros": s.product_zeros, "gate_zeros": s.gate_zeros,
                          "up_zeros": s.up_zeros} for s in sparsity],
    }
    (out / "training.json").write_text(json.dumps(card, indent=2) + "\n")
    table = format_sparsity_table(sparsity)
    (out / "README.md").write_text(f"""# austen-small: a small dReLU Bamboo trained by bamboo

- Architecture: Bamboo (Mistral layout, dReLU FFN `down(relu(gate x) * relu(up x))`), config `{args.config}`:
  hidden 256, FFN 1024, 6 layers, 4 heads (2 KV heads), tied embeddings, {model.num_parameters() / 1e6:.1f}M parameters.
- Data: {provenance["source"]}. Tokenizer: {provenance["tokenizer"]}. Train: five novels,
  {train.numel():,} tokens; validation: {", ".join(provenance["validation"])}, {valid.numel():,} tokens.
- Training: `python examples/train_small_bamboo.py` ({json.dumps({k: v for k, v in vars(args).items() if k != "out"})}),
  from scratch, on {card["device"]}, {elapsed:.0f} s; best validation perplexity at step {best_step}
  of {card["steps_run"]} (early stopping after {args.patience} evaluations without improvement).
- Validation perplexity: {best:.2f} (fp32 weights, bf16 autocast), {bf16_ppl:.2f} with the saved bf16 weights.
- FFN sparsity per layer on validation text (share of exact zeros):

{table}

Weights: model-<save id>-0000N-of-0000M.safetensors (bf16), listed in model.safetensors.index.json. Full numbers: training.json.
Tokenizer: tokenizer.model, tokenizer_config.json (the family's ChatML chat template, which this model never saw in
training: `bamboo generate --chat` refuses it), special_tokens_map.json; with `import bamboo`, transformers'
AutoTokenizer and AutoModelForCausalLM load this directory.
""")
    print(f"saved {out}: validation perplexity {bf16_ppl:.2f} (bf16), best step {best_step}")
    print(table)


if __name__ == "__main__":
    main()
