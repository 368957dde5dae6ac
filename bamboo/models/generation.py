"""Generation with the static KV cache: left-padded batches, greedy or nucleus sampling, streaming.

Sampling runs on the device without host synchronisation (Gumbel-max through exponential noise, as gpt-fast
does). The only host read is the check whether every row has finished, made every `eos_check_every` steps.

Shapes are bucketed so compiled code is reused: the KV cache length is rounded up to a multiple of
`cache_bucket` (the decode step's shapes then depend only on the batch and the bucket), and with
`prompt_bucket` the prompt is left-padded to a multiple of it (the prefill's shapes too).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from bamboo.errors import InputError


def sample_next_token(logits: torch.Tensor, do_sample: bool, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids [batch] from logits [batch, vocab]."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / max(temperature, 1e-5)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token is always kept)
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(-1)


CACHE_BUCKET = 64


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def left_pad(input_ids, attention_mask, length: int, pad_token_id: int):
    """Left-pad prompts to `length` tokens (padding is masked out, so the real tokens' results are unchanged)."""
    extra = length - input_ids.shape[1]
    if extra <= 0:
        return input_ids, attention_mask
    pad = lambda t, value: torch.cat([t.new_full((t.shape[0], extra), value), t], dim=1)  # noqa: E731
    return pad(input_ids, pad_token_id), pad(attention_mask, 0)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate(model, input_ids, attention_mask, max_new_tokens, temperature, top_p, top_k):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise InputError("input_ids must be an integer torch.Tensor of token ids, shape [batch, seq_len]")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise InputError(f"input_ids must have shape [batch, seq_len>0], got {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0:
        raise InputError(f"input_ids is an empty batch (shape {tuple(input_ids.shape)}): pass at least one prompt")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif attention_mask.dim() == 1:
        attention_mask = attention_mask[None]
    if attention_mask.shape != input_ids.shape:
        raise InputError(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids shape "
                         f"{tuple(input_ids.shape)}")
    if not bool(attention_mask[:, -1].all()):
        raise InputError("generation needs left padding: the last position of every row must be a real token; "
                         "pad prompts on the left (tokenizer padding_side='left')")
    vocab = model.config.vocab_size
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
        raise InputError(f"input_ids hold ids outside the vocabulary [0, {vocab})")
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not _is_int(top_k) or top_k < 0:
        raise InputError(f"top_k must be an integer >= 0 (0: no top-k filtering), got {top_k!r}")
    total = input_ids.shape[1] + max_new_tokens
    if total > model.config.max_position_embeddings:
        raise InputError(f"prompt length + max_new_tokens = {total} exceeds max_position_embeddings "
                         f"({model.config.max_position_embeddings}); shorten the prompt or generate fewer tokens")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (temperature, top_p)) \
            or temperature <= 0 or not (0 < top_p <= 1):
        raise InputError(f"temperature must be a number > 0 and top_p a number in (0, 1], got temperature="
                         f"{temperature!r}, top_p={top_p!r}")
    return input_ids.long(), attention_mask.long()


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, max_new_tokens: int = 32,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_token_id: Optional[int] = -1, pad_token_id: Optional[int] = None,
             streamer: Optional[Callable[[torch.Tensor], None]] = None,
             generator: Optional[torch.Generator] = None, keep_cache: bool = False,
             cache_bucket: int = CACHE_BUCKET, prompt_bucket: Optional[int] = None,
             eos_check_every: int = 16) -> torch.Tensor:
    """Prompt plus generated tokens, [batch, prompt_len + new_len].

    `eos_token_id` defaults to the config's (pass None to never stop early); rows that finished are filled
    with `pad_token_id` (default: the eos id). `streamer(tokens)` is called with each step's new tokens [batch].
    keep_cache=True leaves the KV cache in place, so the next call of the same shape reuses its buffers (what
    CUDA-graphed decode wants); by default it is freed. `cache_bucket` and `prompt_bucket` round the cache and
    prompt lengths up (see the module doc); finished rows are checked for every `eos_check_every` steps (and
    every step with a streamer), each check being one host read.
    """
    input_ids, attention_mask = _validate(model, input_ids, attention_mask, max_new_tokens, temperature, top_p, top_k)
    if cache_bucket < 1 or (prompt_bucket is not None and prompt_bucket < 1) or eos_check_every < 1:
        raise InputError("cache_bucket, prompt_bucket and eos_check_every must be >= 1")
    if eos_token_id == -1:
        eos_token_id = model.config.eos_token_id
    if pad_token_id is None:
        pad_token_id = eos_token_id if eos_token_id is not None else 0
    original_len = input_ids.shape[1]
    limit = model.config.max_position_embeddings
    if prompt_bucket is not None:
        padded = min(round_up(original_len, prompt_bucket), limit - max_new_tokens)
        input_ids, attention_mask = left_pad(input_ids, attention_mask, padded, pad_token_id)
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    total = max(min(round_up(prompt_len + max_new_tokens, cache_bucket), limit), prompt_len + max_new_tokens)
    if streamer is not None:
        eos_check_every = 1  # the streamer reads every step's tokens anyway

    model.setup_cache(batch, total, device=device)
    try:
        full_mask = torch.ones(batch, total, dtype=torch.long, device=device)
        full_mask[:, :prompt_len] = attention_mask
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        slots = torch.arange(total, device=device)  # views of it feed each step: no host-to-device copy
        logits = model(input_ids, attention_mask=full_mask, position_ids=positions[:, :prompt_len],
                       cache_position=slots[:prompt_len])
        pick = lambda lg: sample_next_token(lg, do_sample, temperature, top_k, top_p, generator)  # noqa: E731
        tokens = pick(logits[:, -1])
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        generated, all_finished = [], []
        for step in range(max_new_tokens):
            if eos_token_id is not None:
                tokens = torch.where(finished, torch.full_like(tokens, pad_token_id), tokens)
                finished = finished | (tokens == eos_token_id)
                all_finished.append(finished.all())
            generated.append(tokens)
            if streamer is not None:
                streamer(tokens)
            if step == max_new_tokens - 1:
                break
            if eos_token_id is not None and (step + 1) % eos_check_every == 0 and bool(all_finished[-1]):
                break
            slot = prompt_len + step
            logits = model(tokens[:, None], attention_mask=full_mask, position_ids=positions[:, slot:slot + 1],
                           cache_position=slots[slot:slot + 1])
            tokens = pick(logits[:, -1])
    finally:
        if not keep_cache:
            model.clear_cache()
    if all_finished:  # drop the steps run after every row had finished (checks are only every few steps)
        done = torch.stack(all_finished)
        if bool(done.any()):
            generated = generated[:int(done.int().argmax()) + 1]
    return torch.cat([input_ids[:, prompt_len - original_len:], torch.stack(generated, dim=1)], dim=1)
