"""The Bamboo family as transformers classes, registered with the Auto classes when bamboo is imported.

Built on transformers' own Mistral modules: Bamboo is Mistral-7B's layout with the dReLU FFN
`down(relu(gate x) * relu(up x))`, so the classes here only swap the MLP of every layer. They load the checkpoints
bamboo's plain-PyTorch BambooForCausalLM loads (same parameter names, config.json with model_type "bamboo") and
compute the same logits.

The tokenizer (BambooTokenizerFast) is a `tokenizers` BPE built from the checkpoint's SentencePiece model so that it
encodes exactly like SentencePiece: transformers' LlamaTokenizer built from the same file drops a leading space
(its Metaspace pre-tokenizer prepends "▁" only where the text does not start with one) and orders the BPE merges
by piece id instead of SentencePiece's piece score, which merges whitespace runs first (Mistral scores its
whitespace-only pieces -1e9, last of all).
"""
from __future__ import annotations

import torch.nn as nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)
from transformers.activations import ACT2FN
from transformers.models.mistral.configuration_mistral import MistralConfig
from transformers.models.mistral.modeling_mistral import (
    MistralForCausalLM,
    MistralForSequenceClassification,
    MistralModel,
    MistralPreTrainedModel,
)

try:
    from transformers.tokenization_utils_tokenizers import TokenizersBackend as _FastTokenizerBase
except ImportError:  # transformers 4.x: the same base under its old name, without BOS/EOS handling
    from transformers import PreTrainedTokenizerFast as _FastTokenizerBase

from bamboo.models.config import MODEL_TYPE

SPIECE_UNDERLINE = "▁"


class BambooConfig(MistralConfig):
    """Mistral's config with model_type "bamboo" and ReLU as the default activation (Bamboo's dReLU)."""

    model_type = MODEL_TYPE

    def __init__(self, hidden_act: str = "relu", **kwargs):
        super().__init__(hidden_act=hidden_act, **kwargs)


class BambooMLP(nn.Module):
    """dReLU: down(act(gate x) * act(up x)); Mistral's MLP applies the activation to the gate only."""

    def __init__(self, config):
        super().__init__()
        self.hidden_size, self.intermediate_size = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.act_fn(self.up_proj(x)))


def _use_bamboo_mlp(model: MistralModel) -> None:
    for layer in model.layers:
        layer.mlp = BambooMLP(model.config)


class BambooPreTrainedModel(MistralPreTrainedModel):
    config_class = BambooConfig


class BambooModel(MistralModel):
    config_class = BambooConfig

    def __init__(self, config: BambooConfig):
        super().__init__(config)
        _use_bamboo_mlp(self)
        self.post_init()


class BambooForCausalLM(MistralForCausalLM):
    config_class = BambooConfig

    def __init__(self, config: BambooConfig):
        super().__init__(config)
        self.model = BambooModel(config)
        self.post_init()


class BambooForSequenceClassification(MistralForSequenceClassification):
    config_class = BambooConfig

    def __init__(self, config: BambooConfig):
        super().__init__(config)
        setattr(self, self.base_model_prefix, BambooModel(config))
        self.post_init()


def sentencepiece_backend(vocab_file: str):
    """A `tokenizers.Tokenizer` that encodes and decodes like the SentencePiece BPE model in `vocab_file`.

    SentencePiece prepends one "▁" (add_dummy_prefix), turns spaces into "▁", splits words before a "▁" (a run
    of "▁" stays with the next word) and merges the adjacent pair whose piece has the highest score. Here: the
    normalizer prepends and replaces; no pre-tokenizer (the vocabulary has no piece with "▁" after its start but
    whitespace-only pieces, so merges never cross a word); BPE merges ranked by piece score; byte fallback."""
    from tokenizers import Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    with open(vocab_file, "rb") as f:
        proto.ParseFromString(f.read())
    spec = proto.normalizer_spec
    if proto.trainer_spec.model_type != 2 or spec.remove_extra_whitespaces or spec.name not in ("identity", ""):
        raise ValueError(f"{vocab_file} is not a SentencePiece BPE model with an identity normalizer (Mistral's or "
                         "Llama's): BambooTokenizerFast cannot reproduce it")
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    scores = {piece.piece: piece.score for piece in proto.pieces if piece.type == 1}  # normal pieces only
    merges = merges_by_score(vocab, scores)
    unk = proto.pieces[proto.trainer_spec.unk_id].piece
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                              byte_fallback=proto.trainer_spec.byte_fallback))
    steps = [normalizers.Prepend(SPIECE_UNDERLINE)] if spec.add_dummy_prefix else []
    tokenizer.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", SPIECE_UNDERLINE)])
    # no pre-tokenizer: a fresh Tokenizer has none (tokenizers 0.19 refuses to set None)
    strip = [decoders.Strip(content=" ", left=1)] if spec.add_dummy_prefix else []
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(),
                                           decoders.Fuse(), *strip])
    return tokenizer


def merges_by_score(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges for SentencePiece pieces: every split of a scored piece into two vocabulary pieces, the merged
    piece's score first (SentencePiece's order), then the shorter left part, then the parts' ids."""
    merges = []
    for piece, score in scores.items():
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        merges += [(left, right, score) for left, right in sorted(splits, key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


class BambooTokenizerFast(_FastTokenizerBase):
    """Bamboo's tokenizer for AutoTokenizer: the checkpoint's SentencePiece model (tokenizer.model), encoding
    exactly like SentencePiece (and like bamboo.models.tokenizer.BambooTokenizer), BOS added, left padding."""

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    padding_side = "left"
    model_input_names = ["input_ids", "attention_mask"]
    model = None

    def __init__(self, vocab_file=None, unk_token="<unk>", bos_token="<s>", eos_token="</s>", add_bos_token=True,
                 add_eos_token=False, **kwargs):
        for key in ("vocab", "merges", "tokenizer_object", "tokenizer_file", "_spm_precompiled_charsmap"):
            kwargs.pop(key, None)  # what transformers extracted from the file: rebuilt here by score, not id
        if vocab_file is None:
            raise ValueError("BambooTokenizerFast needs the SentencePiece model (tokenizer.model)")
        super().__init__(tokenizer_object=sentencepiece_backend(vocab_file), vocab_file=vocab_file,
                         unk_token=unk_token, bos_token=bos_token, eos_token=eos_token, add_bos_token=add_bos_token,
                         add_eos_token=add_eos_token, **kwargs)
        if not hasattr(self, "update_post_processor"):  # transformers 4.x ignores add_bos_token here
            self._add_special_tokens(add_bos_token, add_eos_token)

    def _add_special_tokens(self, add_bos: bool, add_eos: bool) -> None:
        from tokenizers.processors import TemplateProcessing

        bos = [(self.bos_token, self.bos_token_id)] if add_bos else []
        eos = [(self.eos_token, self.eos_token_id)] if add_eos else []
        single = " ".join([t for t, _ in bos] + ["$A:0"] + [t for t, _ in eos])
        pair = " ".join([single] + [t for t, _ in bos] + ["$B:1"] + [t for t, _ in eos])
        self._tokenizer.post_processor = TemplateProcessing(single=single, pair=pair, special_tokens=bos + eos)

    @classmethod
    def convert_to_native_format(cls, trust_remote_code=False, **kwargs):
        return kwargs  # __init__ builds the backend from vocab_file itself


def register() -> None:
    AutoConfig.register(MODEL_TYPE, BambooConfig, exist_ok=True)
    AutoModel.register(BambooConfig, BambooModel, exist_ok=True)
    AutoModelForCausalLM.register(BambooConfig, BambooForCausalLM, exist_ok=True)
    AutoModelForSequenceClassification.register(BambooConfig, BambooForSequenceClassification, exist_ok=True)
    AutoTokenizer.register(BambooConfig, fast_tokenizer_class=BambooTokenizerFast, exist_ok=True)
