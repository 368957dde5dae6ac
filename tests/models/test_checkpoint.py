import json

import pytest
import torch
from safetensors.torch import save_file

from bamboo.errors import CheckpointError
from bamboo.models import (
    BambooConfig,
    BambooForCausalLM,
    BambooForSequenceClassification,
)


def small_model(**overrides):
    return BambooForCausalLM.from_config(BambooConfig.named("tiny", num_hidden_layers=2, vocab_size=512, **overrides))


def assert_identical(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("shard_size", ["5GB", 200_000])
def test_save_load_round_trip_is_bit_identical(tmp_path, shard_size):
    model = small_model()
    model.save_pretrained(tmp_path, max_shard_size=shard_size)
    files = sorted(p.name for p in tmp_path.iterdir())
    if shard_size == "5GB":
        assert files == ["config.json", "model.safetensors"]
    else:
        assert "model.safetensors.index.json" in files and len([f for f in files if f.startswith("model-")]) > 2
    loaded = BambooForCausalLM.from_pretrained(tmp_path)
    assert_identical(model, loaded)
    ids = torch.randint(0, 512, (1, 5))
    torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_load_in_bf16_and_tied_embeddings(tmp_path):
    model = small_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    loaded = BambooForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.model.norm.weight, model.model.norm.weight.bfloat16())


def test_resaving_as_one_file_removes_old_shards(tmp_path):
    model = small_model()
    model.save_pretrained(tmp_path, max_shard_size=200_000)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert_identical(model, BambooForCausalLM.from_pretrained(tmp_path))


def test_missing_shard(tmp_path):
    small_model().save_pretrained(tmp_path, max_shard_size=200_000)
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing shard"):
        BambooForCausalLM.from_pretrained(tmp_path)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    model = small_model()
    model.save_pretrained(tmp_path)
    state = {k: v for k, v in model.state_dict().items() if "layers.1.mlp.up_proj" not in k}
    state["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        BambooForCausalLM.from_pretrained(tmp_path)
    assert "model.layers.1.mlp.up_proj.weight" in str(info.value)
    assert "model.layers.1.mlp.extra.weight" in str(info.value)
    with pytest.raises(CheckpointError, match="score"):  # wrong class for these weights
        BambooForSequenceClassification.from_pretrained(tmp_path)


def test_wrong_model_type(tmp_path):
    small_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not a Bamboo checkpoint"):
        BambooForCausalLM.from_pretrained(tmp_path)


def test_shape_mismatch(tmp_path):
    small_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 512
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="shape"):
        BambooForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_truncated_or_corrupt_file(tmp_path, damage):
    small_model().save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x10\x00" * 64, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="truncated|corrupt|not a valid"):
        BambooForCausalLM.from_pretrained(tmp_path)


def test_failed_save_leaves_the_directory_as_it_was(tmp_path, monkeypatch):
    model = small_model()
    model.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    import bamboo.models.checkpoint as checkpoint

    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", failing_save)
    other = small_model(rope_theta=5000.0)
    with pytest.raises(CheckpointError, match="left as it was"):
        other.save_pretrained(tmp_path, max_shard_size=200_000)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        BambooForCausalLM.from_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text(small_model().config.to_json_string())
    with pytest.raises(CheckpointError, match="no weights"):
        BambooForCausalLM.from_pretrained(tmp_path)
