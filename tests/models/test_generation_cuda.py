"""The decode path on a GPU: CUDA-graph capture and replay of the compiled decode step, no host sync in it,
exact mode generating the dense model's tokens. Runs the bundled trained model (real activation sparsity) in
bf16, the dtype the sparse kernels serve."""
import pytest
import torch

import bamboo
from bamboo.models import BambooForCausalLM, pretrained_path
from bamboo.models.generation import sample_next_token

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.fixture(scope="module")
def model():
    return BambooForCausalLM.from_pretrained(pretrained_path(), dtype=torch.bfloat16, device="cuda").eval()


@pytest.fixture(scope="module")
def reference():
    return BambooForCausalLM.from_pretrained(pretrained_path(), dtype=torch.float64, device="cuda").eval()


def prompts(batch, length, vocab, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), device="cuda", generator=gen)


def assert_same_greedy_tokens(tokens, dense, reference, prompt_mask, bf16_margin=0.05):
    """Equal tokens, or the first difference is a near tie in the fp64 reference (bf16 rounding may flip it)."""
    if torch.equal(tokens, dense):
        return
    row, col = [int(i) for i in (tokens != dense).nonzero()[0]]
    prompt_len = prompt_mask.shape[1]
    assert col >= prompt_len
    mask = torch.cat([prompt_mask, torch.ones_like(dense[:, prompt_len:])], dim=1)
    logits = reference(dense[row:row + 1, :col], attention_mask=mask[row:row + 1, :col])[0, -1]
    gap = (logits[dense[row, col]] - logits[tokens[row, col]]).abs().item()
    assert gap < bf16_margin * logits.std().item(), f"tokens differ at step {col - prompt_len} by a clear margin"


def decode_step_inputs(batch, prompt_len, total):
    mask = torch.ones(batch, total, dtype=torch.long, device="cuda")
    return mask, torch.full((batch, 1), prompt_len, device="cuda"), torch.tensor([prompt_len], device="cuda")


@torch.no_grad()
def test_reduce_overhead_decode_replays_cuda_graphs_with_no_host_sync(model, reference):
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = bamboo.compile(model, backend="inductor", sparsity="exact", mode="reduce-overhead", dynamic=False)
    ids = prompts(1, 12, model.config.vocab_size)
    for _ in range(3):  # warm-up, then CUDA-graph recording, then replay
        tokens = compiled.generate(ids, max_new_tokens=16, eos_token_id=None, keep_cache=True)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    compiles = compiled.bamboo_report.compiles

    # one more decode step on the kept cache, with inputs made the way generate makes them (same strides, so
    # the same graph replays), sampling included: nothing in it may wait for the GPU
    total = compiled.cache_shape[2]
    mask = torch.ones(1, total, dtype=torch.long, device="cuda")
    positions = (mask.cumsum(-1) - 1)[:, 12:13]
    slot = torch.arange(total, device="cuda")[12:13]
    last = tokens[:, 12].clone()[:, None]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        logits = compiled(last, attention_mask=mask, position_ids=positions, cache_position=slot)
        sample_next_token(logits[:, -1], do_sample=True, temperature=0.8, top_k=50, top_p=0.9)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert compiled.bamboo_report.compiles == compiles  # it replayed; nothing was compiled for it
    compiled.clear_cache()  # the model shares its layers (and so its cache) with `compiled`

    dense = model.generate(ids, max_new_tokens=16, eos_token_id=None)
    assert_same_greedy_tokens(tokens, dense, reference, torch.ones_like(ids))


@torch.no_grad()
def test_decode_step_of_the_eager_op_model_captures_into_a_cuda_graph(model):
    compiled = bamboo.compile(model, sparsity="exact")
    batch, prompt_len, total = 2, 8, 64
    ids = prompts(batch, prompt_len, model.config.vocab_size, seed=1)
    compiled.setup_cache(batch, total)
    mask, positions, slot = decode_step_inputs(batch, prompt_len, total)
    compiled(ids, attention_mask=mask, position_ids=torch.arange(prompt_len, device="cuda").expand(batch, -1),
             cache_position=torch.arange(prompt_len, device="cuda"))
    static_tokens = ids[:, -1:].clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # compile and warm up outside the capture
            compiled(static_tokens, attention_mask=mask, position_ids=positions, cache_position=slot)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_logits = compiled(static_tokens, attention_mask=mask, position_ids=positions, cache_position=slot)
    for seed in (2, 3):
        static_tokens.copy_(prompts(batch, 1, model.config.vocab_size, seed=seed))
        graph.replay()
        expected = compiled(static_tokens, attention_mask=mask, position_ids=positions, cache_position=slot)
        # same kernels and inputs; the down projection's atomic adds may sum in another order
        torch.testing.assert_close(static_logits, expected, rtol=1e-2, atol=1e-2)
    compiled.clear_cache()


@torch.no_grad()
def test_exact_mode_generates_the_dense_tokens_for_a_left_padded_batch(model, reference):
    compiled = bamboo.compile(model, backend="inductor", sparsity="exact", dynamic=False)
    ids = prompts(2, 10, model.config.vocab_size, seed=4)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    tokens = compiled.generate(ids, attention_mask=mask, max_new_tokens=24, eos_token_id=None)
    dense = model.generate(ids, attention_mask=mask, max_new_tokens=24, eos_token_id=None)
    assert not torch.isnan(compiled(ids, attention_mask=mask)).any()
    assert_same_greedy_tokens(tokens, dense, reference, mask)
