"""The Bamboo model family in plain PyTorch (gpt-fast style): RMSNorm, RoPE, grouped-query attention through
scaled_dot_product_attention with sliding-window masking, a static KV cache, and the dReLU FFN.

Parameter names match Bamboo checkpoints (the Mistral layout), so a real state dict loads with strict=True.
The FFN is written as Bamboo's own BambooMLP: the compiler must find it, nothing here marks it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from bamboo.errors import InputError
from bamboo.models.config import BambooConfig

ACT2CLS = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU, "gelu_pytorch_tanh": lambda: nn.GELU("tanh")}


class BambooRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class BambooRotaryEmbedding(nn.Module):
    """cos/sin for the rotate-half RoPE of Llama/Mistral checkpoints, computed from position ids."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self._inv_freq(None), persistent=False)

    def _inv_freq(self, device) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return 1.0 / (self.theta ** exponents)

    def reset_buffers(self, device) -> None:
        self.inv_freq = self._inv_freq(device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q, k, cos, sin):
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class StaticKVCache(nn.Module):
    """Preallocated keys and values [batch, kv_heads, max_seq_len, head_dim]; updated in place at cache slots."""

    def __init__(self, batch_size, num_kv_heads, max_seq_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, cache_position: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k_cache.index_copy_(2, cache_position, k)
        self.v_cache.index_copy_(2, cache_position, v)
        return self.k_cache, self.v_cache


class BambooAttention(nn.Module):
    def __init__(self, config: BambooConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.resolved_head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.kv_cache: Optional[StaticKVCache] = None

    def forward(self, x, cos, sin, mask, cache_position=None):
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, k, cos, sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(cache_position, k, v)
        # grouped-query attention reads each KV head for its group of query heads: no repeat_interleave copy of
        # the (static, whole) cache in every layer at every step
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.num_heads != self.num_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim))


class BambooMLP(nn.Module):
    def __init__(self, config: BambooConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2CLS[config.hidden_act]()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.act_fn(self.up_proj(x)))


class BambooDecoderLayer(nn.Module):
    def __init__(self, config: BambooConfig):
        super().__init__()
        self.self_attn = BambooAttention(config)
        self.mlp = BambooMLP(config)
        self.input_layernorm = BambooRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = BambooRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache_position=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_position)
        return x + self.mlp(self.post_attention_layernorm(x))


class BambooPreTrainedModel(nn.Module):
    """Weight init, cache setup and checkpoint I/O shared by the Bamboo classes."""

    def __init__(self, config: BambooConfig):
        super().__init__()
        if not isinstance(config, BambooConfig):
            raise InputError(f"expected a BambooConfig, got {type(config).__name__}; build one with "
                             "BambooConfig(...) or BambooConfig.named('tiny')")
        self.config = config

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, BambooRMSNorm):
            nn.init.ones_(module.weight)

    @classmethod
    def from_config(cls, config: BambooConfig | str, seed: int = 0, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, **overrides):
        """A randomly initialised model (seeded, so the same seed gives the same weights)."""
        if isinstance(config, str):
            config = BambooConfig.named(config, **overrides)
        elif overrides:
            config = config.replace(**overrides)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(config)
            model.apply(model._init_weights)
            model.tie_weights()
        return model.to(dtype=dtype, device=device)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings and hasattr(self, "lm_head"):
            self.lm_head.weight = self.base_model.embed_tokens.weight

    @property
    def base_model(self) -> "BambooModel":
        return self.model

    def reset_non_persistent_buffers(self, device) -> None:
        for module in self.modules():
            if isinstance(module, BambooRotaryEmbedding):
                module.reset_buffers(device)

    def setup_cache(self, batch_size: int, max_seq_len: int, dtype=None, device=None) -> None:
        """Allocate a static KV cache in every attention layer (kept out of the state dict). A cache of the same
        shape, dtype and device is reused (zeroed), so compiled code and CUDA graphs keep their buffers."""
        param = next(self.parameters())
        dtype, device = dtype or param.dtype, torch.device(device or param.device)
        shape = self.kv_cache_shape(batch_size, max_seq_len)
        for layer in self.base_model.layers:
            cache = layer.self_attn.kv_cache
            if (cache is not None and tuple(cache.k_cache.shape) == shape and cache.k_cache.dtype == dtype
                    and cache.k_cache.device == device):
                cache.k_cache.zero_()
                cache.v_cache.zero_()
            else:
                layer.self_attn.kv_cache = StaticKVCache(*shape[:2], max_seq_len, shape[3], dtype, device)

    def kv_cache_shape(self, batch_size: int, max_seq_len: int) -> tuple[int, int, int, int]:
        """[batch, kv_heads, slots, head_dim]: one layer's keys (or values)."""
        return batch_size, self.config.num_key_value_heads, max_seq_len, self.config.resolved_head_dim

    def clear_cache(self) -> None:
        for layer in self.base_model.layers:
            layer.self_attn.kv_cache = None

    @property
    def cache_shape(self):
        cache = self.base_model.layers[0].self_attn.kv_cache
        return None if cache is None else tuple(cache.k_cache.shape)

    @classmethod
    def from_pretrained(cls, directory, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu"):
        """Load a checkpoint directory. dtype: a floating torch dtype or its name ("bfloat16", "float16",
        "float32"); None or "auto" keep the checkpoint's."""
        from bamboo.models.checkpoint import load_pretrained

        return load_pretrained(cls, directory, dtype=dtype, device=device)

    def save_pretrained(self, directory, max_shard_size: int | str = "5GB") -> None:
        from bamboo.models.checkpoint import save_pretrained

        save_pretrained(self, directory, max_shard_size=max_shard_size)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


def _check_input_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    if not isinstance(input_ids, torch.Tensor):
        raise InputError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise InputError(f"input_ids must have shape [batch, seq_len], got {tuple(input_ids.shape)}; "
                         "add a batch dimension with input_ids[None]")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise InputError(f"input_ids must be int64 (token ids), got {input_ids.dtype}")
    # The range check reads the ids on the host: done for CPU tensors outside compilation only (on a GPU it would
    # synchronise every decode step; generate checks the prompt once instead).
    if input_ids.device.type == "cpu" and input_ids.numel() and not torch.compiler.is_compiling():
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab_size:
            raise InputError(f"input_ids hold token id {low if low < 0 else high}, outside the vocabulary [0, "
                             f"{vocab_size}): the tokenizer does not match this model (config vocab_size "
                             f"{vocab_size})")


def build_attention_mask(query_slots, key_slots, key_valid, sliding_window):
    """Boolean mask [batch, 1, queries, keys]: causal, inside the sliding window, key not padding.

    Left padding keeps slot distance equal to position distance for real tokens, so the window can be applied
    on slots. Each query may always see itself, so padded query rows never become all-masked (NaN in SDPA).
    """
    distance = query_slots[:, None] - key_slots[None, :]
    allowed = distance >= 0
    if sliding_window is not None:
        allowed = allowed & (distance < sliding_window)
    mask = allowed[None] & key_valid[:, None, :]
    mask = mask | (distance == 0)[None]
    return mask[:, None]


class BambooModel(BambooPreTrainedModel):
    def __init__(self, config: BambooConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(BambooDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = BambooRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = BambooRotaryEmbedding(config.resolved_head_dim, config.rope_theta)

    @property
    def base_model(self) -> "BambooModel":
        return self

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache_position=None):
        """Hidden states [batch, seq, hidden].

        Without a KV cache, attention covers the given tokens. With one (see setup_cache), `cache_position`
        [seq] gives the cache slots of the tokens and `attention_mask` [batch, slots] marks real (1) and padded
        (0) slots of the whole cache.
        """
        _check_input_ids(input_ids, self.config.vocab_size)
        batch, seq = input_ids.shape
        device = input_ids.device
        cache = self.layers[0].self_attn.kv_cache
        if cache is not None:
            if cache_position is None:
                raise InputError("a KV cache is set up, so cache_position (the cache slots of these tokens) is "
                                 "required; call model.clear_cache() to run without the cache")
            num_keys = cache.k_cache.shape[2]
            if cache.k_cache.shape[0] != batch:
                raise InputError(f"the KV cache was set up for batch size {cache.k_cache.shape[0]} but input_ids "
                                 f"has batch size {batch}; call model.setup_cache({batch}, max_seq_len)")
        else:
            num_keys = seq
            if cache_position is None:
                cache_position = torch.arange(seq, device=device)
        if attention_mask is None:
            key_valid = torch.ones(batch, num_keys, dtype=torch.bool, device=device)
        else:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] > num_keys:
                raise InputError(f"attention_mask must have shape [batch={batch}, keys<={num_keys}], got "
                                 f"{tuple(attention_mask.shape)}")
            key_valid = F.pad(attention_mask.bool(), (0, num_keys - attention_mask.shape[1]), value=True)
        if position_ids is None:
            if attention_mask is not None:  # left padding: real tokens count from 0
                positions = (key_valid.long().cumsum(-1) - 1).clamp(min=0)
                position_ids = positions[:, cache_position]
            else:
                position_ids = cache_position[None].expand(batch, seq)
        key_slots = torch.arange(num_keys, device=device)
        mask = build_attention_mask(cache_position, key_slots, key_valid, self.config.sliding_window)

        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache_position)
        return self.norm(x)


class BambooForCausalLM(BambooPreTrainedModel):
    def __init__(self, config: BambooConfig):
        super().__init__(config)
        self.model = BambooModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache_position=None):
        """Logits [batch, seq, vocab] in float32."""
        hidden = self.model(input_ids, attention_mask, position_ids, cache_position)
        return self.lm_head(hidden).float()

    def generate(self, input_ids, **kwargs):
        from bamboo.models.generation import generate

        return generate(self, input_ids, **kwargs)


class BambooForSequenceClassification(BambooPreTrainedModel):
    """Scores the last real token of each sequence, as Mistral's classifier does."""

    def __init__(self, config: BambooConfig):
        super().__init__(config)
        self.model = BambooModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)

    def last_token_index(self, input_ids, attention_mask=None):
        if attention_mask is not None:
            real = attention_mask.bool()
        elif self.config.pad_token_id is not None:
            real = input_ids != self.config.pad_token_id
        else:
            return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
        slots = torch.arange(input_ids.shape[1], device=input_ids.device)
        return (slots * real).argmax(-1)  # the rightmost real token, for left or right padding

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        hidden = self.model(input_ids, attention_mask, position_ids)
        last = self.last_token_index(input_ids, attention_mask)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.score(pooled).float()
