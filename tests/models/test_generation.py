import pytest
import torch

from bamboo.errors import InputError
from bamboo.models import BambooConfig, BambooForCausalLM
from bamboo.models.generation import sample_next_token


@pytest.fixture(scope="module")
def model():
    config = BambooConfig.named("tiny", num_hidden_layers=2, vocab_size=512, initializer_range=0.2)
    return BambooForCausalLM.from_config(config, seed=5).eval()


def greedy_without_cache(model, ids, steps):
    for _ in range(steps):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@torch.no_grad()
def test_greedy_generation_equals_recomputing_without_cache(model):
    ids = torch.randint(0, 512, (2, 6))
    out = model.generate(ids, max_new_tokens=8, eos_token_id=None)
    assert out.shape == (2, 14)
    assert torch.equal(out, greedy_without_cache(model, ids, 8))
    assert model.cache_shape is None  # the cache is released afterwards


@torch.no_grad()
def test_left_padded_batch_generates_what_each_prompt_generates_alone(model):
    a, b = torch.randint(1, 512, (1, 3)), torch.randint(1, 512, (1, 7))
    ids = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), a], 1), b])
    mask = torch.tensor([[0] * 4 + [1] * 3, [1] * 7])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None)
    assert torch.equal(out[0, 7:], model.generate(a, max_new_tokens=6, eos_token_id=None)[0, 3:])
    assert torch.equal(out[1, 7:], model.generate(b, max_new_tokens=6, eos_token_id=None)[0, 7:])


def token_first_generated_at(model, ids, candidates):
    """(token, index): a generated token that first appears at one of the `candidates` indices, to use as eos."""
    free = model.generate(ids, max_new_tokens=max(candidates) + 1, eos_token_id=None)[0, ids.shape[1]:].tolist()
    ends = [j for j in candidates if free[j] not in free[:j]]
    assert ends, f"this prompt's generation repeats one token: {free}"
    return free[ends[0]], ends[0]


@torch.no_grad()
def test_eos_stops_and_pads_finished_rows(model):
    ids = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(1))
    eos, end = token_first_generated_at(model, ids, range(2, 6))
    out = model.generate(ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert out.shape[1] == 5 + end + 1 and out[0, -1] == eos


@torch.no_grad()
def test_streaming_sees_every_token_in_order(model):
    seen = []
    out = model.generate(torch.randint(0, 512, (2, 4)), max_new_tokens=5, eos_token_id=None,
                         streamer=lambda t: seen.append(t.clone()))
    assert torch.equal(torch.stack(seen, 1), out[:, 4:])


def test_sampling_is_seeded_and_respects_top_k_and_top_p():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0, -2.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    picks = sample_next_token(logits, True, top_k=2, generator=g)
    assert set(picks.tolist()) == {0, 1}
    picks = sample_next_token(logits, True, top_p=0.5, generator=g)
    assert set(picks.tolist()) == {0}
    # top_p keeps the token whose mass crosses it: probabilities 0.705, 0.259, ...; 0.9 needs the first two
    # (a top_p the first token alone exceeds could not tell that from dropping the crossing token)
    picks = sample_next_token(logits, True, top_p=0.9, generator=g)
    assert set(picks.tolist()) == {0, 1}
    probs = torch.softmax(logits[0], 0)
    assert abs((picks == 1).float().mean().item() - (probs[1] / probs[:2].sum()).item()) < 0.05
    picks = sample_next_token(logits, True, temperature=1.0, generator=g)
    share = (picks == 0).float().mean().item()
    assert abs(share - torch.softmax(logits[0], 0)[0].item()) < 0.05
    a = sample_next_token(logits[:5], True, generator=torch.Generator().manual_seed(7))
    b = sample_next_token(logits[:5], True, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_bad_generation_inputs(model):
    with pytest.raises(InputError, match="left padding"):
        model.generate(torch.ones(1, 4, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 1, 0]]))
    with pytest.raises(InputError, match="outside the vocabulary"):
        model.generate(torch.tensor([[5, 600]]))
    with pytest.raises(InputError, match="max_position_embeddings"):
        model.generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=5000)
    with pytest.raises(InputError, match="integer"):
        model.generate(torch.ones(1, 4))


@pytest.mark.parametrize("kwargs, message", [
    (dict(input_ids=torch.ones(0, 4, dtype=torch.long)), r"empty batch \(shape \(0, 4\)\): pass at least one prompt"),
    (dict(max_new_tokens=8.0), r"max_new_tokens must be an integer >= 1, got 8.0"),
    (dict(max_new_tokens=True), r"max_new_tokens must be an integer >= 1, got True"),
    (dict(top_k=-1, do_sample=True), r"top_k must be an integer >= 0 \(0: no top-k filtering\), got -1"),
    (dict(top_k=2.5), r"top_k must be an integer >= 0"),
    (dict(temperature="hot"), r"temperature must be a number > 0"),
])
@torch.no_grad()
def test_generation_arguments_of_the_wrong_type_or_value(model, kwargs, message):
    kwargs = {"input_ids": torch.ones(1, 4, dtype=torch.long), **kwargs}
    with pytest.raises(InputError, match=message):
        model.generate(**kwargs)


@torch.no_grad()
def test_kept_cache_is_reused_and_gives_the_same_tokens(model):
    ids = torch.randint(0, 512, (2, 5))
    first = model.generate(ids, max_new_tokens=6, eos_token_id=None, keep_cache=True)
    buffer = model.model.layers[0].self_attn.kv_cache.k_cache
    second = model.generate(ids, max_new_tokens=6, eos_token_id=None, keep_cache=True)
    assert model.model.layers[0].self_attn.kv_cache.k_cache is buffer  # same storage: no re-allocation
    assert torch.equal(first, second)
    model.clear_cache()


@torch.no_grad()
def test_shape_buckets_change_no_token(model):
    ids = torch.randint(0, 512, (2, 5))
    exact_shapes = model.generate(ids, max_new_tokens=7, eos_token_id=None, cache_bucket=1)
    assert torch.equal(model.generate(ids, max_new_tokens=7, eos_token_id=None), exact_shapes)
    bucketed = model.generate(ids, max_new_tokens=7, eos_token_id=None, prompt_bucket=16, keep_cache=True)
    assert torch.equal(bucketed, exact_shapes)  # the padding is dropped from the result
    assert model.cache_shape[2] == 64  # 16 (padded prompt) + 7, rounded up to the default bucket
    model.clear_cache()


@torch.no_grad()
def test_eos_checked_every_few_steps_still_stops_where_every_row_finished(model, monkeypatch):
    ids = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(0))
    eos, end = token_first_generated_at(model, ids, range(2, 6))
    calls = []
    real_forward = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda self, *a, **k: calls.append(1) or real_forward(self, *a, **k))
    out = model.generate(ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=0, eos_check_every=4)
    assert out.shape[1] == 5 + end + 1 and out[0, -1] == eos  # trimmed to the step where the row ended
    # prefill, then decode steps until the first check (after the 4th or 8th token) that sees the eos
    assert len(calls) == 1 + (3 if end < 4 else 7)
