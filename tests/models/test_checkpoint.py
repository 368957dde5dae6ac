import json

import pytest
import torch
from safetensors.torch import save_file

from bamboo.errors import CheckpointError, InputError
from bamboo.models import (
    BambooConfig,
    BambooForCausalLM,
    BambooForSequenceClassification,
)


def small_model(seed=0, **overrides):
    config = BambooConfig.named("tiny", num_hidden_layers=2, vocab_size=512, **overrides)
    return BambooForCausalLM.from_config(config, seed=seed)


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
    next(tmp_path.glob("model-*-00002-of-*.safetensors")).unlink()
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


@pytest.mark.parametrize("damage, message", [
    # each damage has its own message: a loader that lost the truncation check would report the generic one
    ("truncate", r"model.safetensors is truncated: its header describes \d+ bytes but the file has \d+"),
    ("garbage", r"not a valid safetensors file \(header length \d+ exceeds the file size"),
    ("empty", r"not a valid safetensors file \(file is shorter than the 8-byte header length"),
])
def test_truncated_or_corrupt_file(tmp_path, damage, message):
    small_model().save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x10\x00" * 64, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=message):
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


# -- loading arguments: each wrong one named, never reported as a corrupt file ---------------------------------

@pytest.mark.parametrize("dtype, expected", [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                             ("torch.float32", torch.float32), ("auto", torch.float32)])
def test_dtype_given_as_a_string(tmp_path, dtype, expected):
    small_model().save_pretrained(tmp_path)
    assert BambooForCausalLM.from_pretrained(tmp_path, dtype=dtype).lm_head.weight.dtype == expected


@pytest.mark.parametrize("dtype, message", [(torch.int8, "torch.int8 is not a floating-point dtype"),
                                            ("int8", "dtype='int8' is not a dtype bamboo loads weights in"),
                                            (3, "dtype must be a torch.dtype or a name")])
def test_non_float_dtype_is_refused(tmp_path, dtype, message):
    small_model().save_pretrained(tmp_path)
    with pytest.raises(InputError, match=message):
        BambooForCausalLM.from_pretrained(tmp_path, dtype=dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_device_without_a_gpu_says_so(tmp_path):
    small_model().save_pretrained(tmp_path)
    with pytest.raises(InputError, match="no CUDA device is visible here") as info:
        BambooForCausalLM.from_pretrained(tmp_path, device="cuda")
    assert "corrupt" not in str(info.value)


# -- damaged indexes and headers ---------------------------------------------------------------------------------

def _edit_index(directory, edit):
    path = directory / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    edit(index["weight_map"])
    path.write_text(json.dumps(index))


def test_index_mapping_a_tensor_to_a_shard_without_it(tmp_path):
    small_model().save_pretrained(tmp_path, max_shard_size=200_000)
    files = sorted({f for f in json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values()})
    _edit_index(tmp_path, lambda m: m.update({"model.norm.weight": files[0] if m["model.norm.weight"] != files[0]
                                              else files[1]}))
    with pytest.raises(CheckpointError, match="maps tensor model.norm.weight to .* which does not hold it"):
        BambooForCausalLM.from_pretrained(tmp_path)


def test_index_entry_outside_the_checkpoint_directory_is_refused(tmp_path):
    (tmp_path / "ckpt").mkdir()
    small_model().save_pretrained(tmp_path / "ckpt", max_shard_size=200_000)
    (tmp_path / "other").mkdir()
    first = sorted((tmp_path / "ckpt").glob("model-*.safetensors"))[0]
    (tmp_path / "other" / "x.safetensors").write_bytes(first.read_bytes())
    _edit_index(tmp_path / "ckpt", lambda m: m.update({k: "../other/x.safetensors" for k, v in m.items()
                                                       if v == first.name}))
    with pytest.raises(CheckpointError, match=r"names the shard '../other/x.safetensors', outside the checkpoint"):
        BambooForCausalLM.from_pretrained(tmp_path / "ckpt")


def _write_raw_safetensors(path, header):
    import struct

    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 64)


@pytest.mark.parametrize("header, message", [
    ([1, 2, 3], "its header is a JSON list, not an object"),
    ({"model.norm.weight": {"dtype": "F32", "shape": [128]}}, "'model.norm.weight' has no valid data_offsets"),
    ({"model.norm.weight": {"dtype": "F32", "shape": "x", "data_offsets": [0, 4]}}, "has no valid shape"),
    ({"model.norm.weight": [0, 4]}, "header entry of 'model.norm.weight' is not an object"),
])
def test_malformed_safetensors_header(tmp_path, header, message):
    small_model().save_pretrained(tmp_path)
    _write_raw_safetensors(tmp_path / "model.safetensors", header)
    with pytest.raises(CheckpointError, match=message):
        BambooForCausalLM.from_pretrained(tmp_path)


def test_stale_scratch_of_a_killed_save_is_removed_by_the_next_save(tmp_path):
    small_model().save_pretrained(tmp_path)
    (tmp_path / ".bamboo-save-deadbeef").mkdir()  # what a save killed mid-way used to leave behind
    (tmp_path / ".bamboo-save-deadbeef" / "model.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / ".bamboo-save-0badf00d-model.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / "model-0badf00d-00001-of-00002.safetensors").write_bytes(b"\0" * 1000)  # a shard no index names
    small_model(seed=1).save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
