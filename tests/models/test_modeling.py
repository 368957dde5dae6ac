import pytest
import torch

from bamboo.errors import InputError
from bamboo.models import (
    BambooConfig,
    BambooForCausalLM,
    BambooForSequenceClassification,
    BambooModel,
)


def small_config(**overrides):
    return BambooConfig.named("tiny", num_hidden_layers=2, vocab_size=512, **overrides)


def test_bamboo_7b_has_7_24b_parameters_on_meta():
    with torch.device("meta"):
        model = BambooForCausalLM(BambooConfig.named("bamboo-7b"))
    assert round(model.num_parameters() / 1e9, 2) == 7.24


def test_state_dict_keys_are_the_bamboo_checkpoint_names():
    model = BambooForCausalLM.from_config(small_config())
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(2):
        expected |= {f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"}
        expected |= {f"model.layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
        expected |= {f"model.layers.{i}.{n}_layernorm.weight" for n in ("input", "post_attention")}
    assert set(model.state_dict()) == expected
    model.setup_cache(1, 8)  # the cache stays out of the state dict
    assert set(model.state_dict()) == expected
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (2 * 32, 128)


def test_same_seed_same_weights():
    a = BambooForCausalLM.from_config(small_config(), seed=3)
    b = BambooForCausalLM.from_config(small_config(), seed=3)
    c = BambooForCausalLM.from_config(small_config(), seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


@torch.no_grad()
def test_kv_cache_decoding_equals_recomputing_the_sequence():
    torch.manual_seed(0)
    model = BambooForCausalLM.from_config(small_config()).eval()
    ids = torch.randint(0, 512, (2, 11))
    full = model(ids)
    model.setup_cache(2, 16)
    mask = torch.ones(2, 16, dtype=torch.long)
    prefix = model(ids[:, :6], attention_mask=mask, cache_position=torch.arange(6))
    steps = [model(ids[:, t:t + 1], attention_mask=mask, cache_position=torch.tensor([t])) for t in range(6, 11)]
    model.clear_cache()
    incremental = torch.cat([prefix] + steps, dim=1)
    torch.testing.assert_close(incremental, full, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_left_padded_batch_equals_each_sequence_alone():
    torch.manual_seed(1)
    model = BambooForCausalLM.from_config(small_config()).eval()
    short, long = torch.randint(1, 512, (1, 5)), torch.randint(1, 512, (1, 9))
    ids = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.tensor([[0] * 4 + [1] * 5, [1] * 9])
    batched = model(ids, attention_mask=mask)
    assert not batched.isnan().any()
    torch.testing.assert_close(batched[0, 4:], model(short)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched[1], model(long)[0], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_sliding_window_is_honoured():
    torch.manual_seed(2)
    window = 4
    model = BambooForCausalLM.from_config(small_config(sliding_window=window)).eval()
    ids = torch.randint(0, 512, (1, 12))
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % 512
    a, b = model(ids), model(changed)
    # With one layer a token cannot see past its window; with two, influence reaches 2*(window-1) positions.
    reach = model.config.num_hidden_layers * (window - 1)
    torch.testing.assert_close(a[0, reach + 1:], b[0, reach + 1:], rtol=0, atol=0)
    assert not torch.allclose(a[0, 1:reach + 1], b[0, 1:reach + 1])
    no_window = BambooForCausalLM.from_config(small_config(sliding_window=None)).eval()
    assert not torch.allclose(no_window(ids)[0, -1], no_window(changed)[0, -1])


@torch.no_grad()
def test_classification_pools_the_last_real_token():
    torch.manual_seed(3)
    config = small_config(num_labels=3, pad_token_id=0)
    clf = BambooForSequenceClassification.from_config(config).eval()
    seq = torch.randint(1, 512, (1, 6))
    alone = clf(seq)
    right_padded = torch.cat([seq, torch.zeros(1, 3, dtype=torch.long)], 1)
    torch.testing.assert_close(clf(right_padded), alone, rtol=1e-5, atol=1e-5)  # causal: pads after do not matter
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), seq], 1)
    left_mask = torch.tensor([[0, 0, 0] + [1] * 6])
    torch.testing.assert_close(clf(left, attention_mask=left_mask), alone, rtol=1e-5, atol=1e-5)
    assert clf.last_token_index(right_padded).tolist() == [5]
    assert clf(torch.randint(1, 512, (4, 6))).shape == (4, 3)


def test_bad_inputs_raise_clear_errors():
    model = BambooForCausalLM.from_config(small_config())
    with pytest.raises(InputError, match="shape \\[batch, seq_len\\]"):
        model(torch.randint(0, 512, (7,)))
    with pytest.raises(InputError, match="int64"):
        model(torch.randn(1, 4))
    with pytest.raises(InputError, match="attention_mask"):
        model(torch.randint(0, 512, (2, 4)), attention_mask=torch.ones(3, 4))
    model.setup_cache(1, 8)
    with pytest.raises(InputError, match="cache_position"):
        model(torch.randint(0, 512, (1, 4)))
    with pytest.raises(InputError, match="batch size"):
        model(torch.randint(0, 512, (2, 4)), cache_position=torch.arange(4))
    model.clear_cache()
    with pytest.raises(InputError, match="BambooConfig"):
        BambooModel({"hidden_size": 8})


@pytest.mark.parametrize("bad_id", [512, 10_000, -1])
def test_token_ids_outside_the_vocabulary_are_named_not_an_index_error(bad_id):
    model = BambooForCausalLM.from_config(small_config())
    with pytest.raises(InputError, match=rf"input_ids hold token id {bad_id}, outside the vocabulary \[0, 512\)"):
        model(torch.tensor([[5, bad_id, 7]]))


def test_model_compiles_without_graph_breaks():
    model = BambooForCausalLM.from_config(small_config()).eval()
    ids = torch.randint(0, 512, (2, 5))
    explanation = torch._dynamo.explain(model)(ids)
    assert explanation.graph_break_count == 0


def test_grouped_query_attention_equals_repeated_kv_heads_without_copying_them():
    """Each KV head serves its group of query heads inside SDPA (enable_gqa): the same values as repeating the
    KV heads, and no repeat_interleave of the (static, whole) cache in the graph."""
    from bamboo.models.modeling import apply_rotary

    config = small_config(num_attention_heads=8, num_key_value_heads=2)
    model = BambooForCausalLM.from_config(config, seed=4).eval()
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 5, config.hidden_size)
    cos, sin = model.model.rotary_emb(torch.arange(5)[None].expand(2, 5), x.dtype)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    q = attn.q_proj(x).view(2, 5, 8, -1).transpose(1, 2)
    k = attn.k_proj(x).view(2, 5, 2, -1).transpose(1, 2)
    v = attn.v_proj(x).view(2, 5, 2, -1).transpose(1, 2)
    q, k = apply_rotary(q, k, cos, sin)
    out = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                                           attn_mask=mask)
    expected = attn.o_proj(out.transpose(1, 2).reshape(2, 5, -1))
    with torch.no_grad():
        torch.testing.assert_close(attn(x, cos, sin, mask), expected, rtol=1e-5, atol=1e-5)
    program = torch.export.export(model, (torch.randint(3, 500, (2, 6)),))
    assert not [n for n in program.graph.nodes if "repeat_interleave" in str(n.target)]
