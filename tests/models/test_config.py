import json

import pytest

from bamboo.errors import ConfigError
from bamboo.models import BambooConfig

# config.json of PowerInfer/Bamboo-base-v0_1 (fields as the design notes give them, plus the usual HF extras)
BAMBOO_7B_JSON = {
    "architectures": ["BambooForCausalLM"], "model_type": "bamboo", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 32000, "rope_theta": 10000.0, "rms_norm_eps": 1e-05, "max_position_embeddings": 32768,
    "sliding_window": 4096, "hidden_act": "relu", "tie_word_embeddings": False, "bos_token_id": 1,
    "eos_token_id": 2, "torch_dtype": "bfloat16", "initializer_range": 0.02, "use_cache": True,
    "transformers_version": "4.36.0", "auto_map": {"AutoConfig": "configuration_bamboo.BambooConfig"},
}


def test_bamboo_7b_preset_matches_the_checkpoint_config():
    config = BambooConfig.named("bamboo-7b")
    for key, value in BAMBOO_7B_JSON.items():
        if key not in ("transformers_version", "auto_map"):
            assert getattr(config, key) == value, key
    assert config.resolved_head_dim == 128


def test_json_round_trip_keeps_every_field_and_unknown_keys(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(BAMBOO_7B_JSON))
    config = BambooConfig.from_json_file(path)
    assert config.extra == {"transformers_version": "4.36.0", "auto_map": BAMBOO_7B_JSON["auto_map"]}
    config.save(tmp_path / "again.json")
    again = BambooConfig.from_json_file(tmp_path / "again.json")
    assert again == config
    assert json.loads((tmp_path / "again.json").read_text())["auto_map"] == BAMBOO_7B_JSON["auto_map"]
    for key, value in BAMBOO_7B_JSON.items():
        assert again.to_dict()[key] == value


@pytest.mark.parametrize("changes, message", [
    ({"model_type": "mistral"}, "not a Bamboo checkpoint"),
    ({"num_attention_heads": 32, "num_key_value_heads": 5}, "multiple of num_key_value_heads"),
    ({"hidden_size": 4100}, "not divisible"),
    ({"hidden_act": "swish"}, "not supported"),
    ({"vocab_size": 0}, "positive integer"),
    ({"sliding_window": -1}, "sliding_window"),
    ({"eos_token_id": 40000}, "outside the vocabulary"),
])
def test_invalid_configs_are_refused_with_a_reason(changes, message):
    with pytest.raises(ConfigError, match=message):
        BambooConfig.from_dict({**BAMBOO_7B_JSON, **changes})


def test_bad_json_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no config file"):
        BambooConfig.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        BambooConfig.from_json_file(tmp_path / "config.json")
    with pytest.raises(ConfigError, match="unknown config name"):
        BambooConfig.named("bamboo-70b")
