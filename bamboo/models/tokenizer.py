"""A small tokenizer wrapper around a SentencePiece model (by default Mistral-7B's, shipped in mistral-common)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterable, Optional

import torch

from bamboo.errors import InputError, MissingDependencyError, require

CHATML_TURN = "<|im_start|>{role}\n{content}<|im_end|>\n"
# The same ChatML as BambooTokenizer.apply_chat_template, in the Jinja form transformers' apply_chat_template reads.
CHATML_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                   "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                   "{% endif %}")
TOKENIZER_MODEL_NAME, TOKENIZER_CONFIG_NAME = "tokenizer.model", "tokenizer_config.json"


def default_tokenizer_file() -> Path:
    """Mistral-7B-v0.1's SentencePiece model, as shipped inside the mistral-common package."""
    try:
        import mistral_common
    except ImportError:
        raise MissingDependencyError(
            "the default tokenizer is Mistral's SentencePiece model from the package 'mistral-common', which is not "
            "installed; pip install 'bamboo-compiler[tokenizer]', or pass model_file=path/to/tokenizer.model") from None
    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.exists():
        raise MissingDependencyError(f"mistral-common is installed but has no {path.name}; pass model_file=")
    return path


def chat_template(checkpoint_dir) -> Optional[str]:
    """The chat template a checkpoint ships (tokenizer_config.json's "chat_template", the Hugging Face place), or
    None: a model trained on plain text has none, and wrapping its prompt in ChatML only confuses it."""
    import json

    path = Path(checkpoint_dir) / "tokenizer_config.json"
    try:
        template = json.loads(path.read_text()).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    return template or None


def trained_on_plain_text(checkpoint_dir) -> bool:
    """True when the checkpoint's training record (training.json, written by examples/train_small_bamboo.py) says
    it was trained on plain text only ("chat": false): it may ship the family's chat template, so that transformers'
    apply_chat_template runs, but it never saw the ChatML markers."""
    import json

    try:
        record = json.loads((Path(checkpoint_dir) / "training.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("chat") is False


class BambooTokenizer:
    def __init__(self, model_file: Optional[str | os.PathLike] = None, padding_side: str = "left"):
        spm = require("sentencepiece", "tokenizer", "BambooTokenizer")
        self.model_file = Path(model_file) if model_file else default_tokenizer_file()
        if not self.model_file.exists():
            raise InputError(f"tokenizer model file {self.model_file} does not exist")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        self.padding_side = padding_side
        self.bos_token_id, self.eos_token_id = self.sp.bos_id(), self.sp.eos_id()
        self.unk_token_id = self.sp.unk_id()
        self.pad_token_id = self.unk_token_id  # Bamboo pads with <unk> (id 0)

    @classmethod
    def from_pretrained(cls, checkpoint_dir, padding_side: str = "left") -> "BambooTokenizer":
        """The tokenizer a checkpoint ships (its tokenizer.model), or Mistral's default one if it ships none."""
        path = Path(checkpoint_dir) / TOKENIZER_MODEL_NAME
        return cls(path if path.exists() else None, padding_side=padding_side)

    def save_pretrained(self, directory: str | os.PathLike, chat_template: Optional[str] = CHATML_TEMPLATE) -> list[Path]:
        """Write the tokenizer files of a Hugging Face checkpoint: tokenizer.model (this SentencePiece model),
        tokenizer_config.json and special_tokens_map.json. With `import bamboo`, transformers' AutoTokenizer loads
        them as BambooTokenizerFast, which encodes exactly like this tokenizer (BOS added; special-token strings
        in the text stay text, as SentencePiece reads them). `chat_template`: the ChatML of apply_chat_template;
        None writes none."""
        import json
        import shutil

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        model_path = directory / TOKENIZER_MODEL_NAME
        if not (model_path.exists() and model_path.samefile(self.model_file)):
            shutil.copyfile(self.model_file, model_path)
        special = {"bos_token": self.sp.id_to_piece(self.bos_token_id), "eos_token": self.sp.id_to_piece(self.eos_token_id),
                   "unk_token": self.sp.id_to_piece(self.unk_token_id), "pad_token": self.sp.id_to_piece(self.pad_token_id)}
        config = {"tokenizer_class": "BambooTokenizerFast", **special, "add_bos_token": True, "add_eos_token": False,
                  "split_special_tokens": True, "padding_side": self.padding_side, "clean_up_tokenization_spaces": False,
                  "model_max_length": 32768}
        if chat_template is not None:
            config["chat_template"] = chat_template
        paths = [model_path, directory / TOKENIZER_CONFIG_NAME, directory / "special_tokens_map.json"]
        paths[1].write_text(json.dumps(config, indent=2) + "\n")
        paths[2].write_text(json.dumps(special, indent=2) + "\n")
        return paths

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_token_id] if add_bos else []) + ids + ([self.eos_token_id] if add_eos else [])

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        special = {self.bos_token_id, self.eos_token_id, self.pad_token_id}
        return self.sp.decode([i for i in ids if not (skip_special_tokens and i in special)])

    def __call__(self, texts: str | list[str], add_bos: bool = True) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask [batch, longest], padded on `padding_side`."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        encoded = [self.encode(t, add_bos=add_bos) for t in texts]
        longest = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), longest), dtype=torch.long)
        for row, e in enumerate(encoded):
            span = slice(longest - len(e), longest) if self.padding_side == "left" else slice(0, len(e))
            ids[row, span] = torch.tensor(e)
            mask[row, span] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = False):
        """ChatML: <|im_start|>role\\ncontent<|im_end|>\\n per turn, then the assistant's opening."""
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise InputError(f"each chat message must be a dict with 'role' and 'content', got {m!r}")
        text = "".join(CHATML_TURN.format(role=m["role"], content=m["content"]) for m in messages)
        if add_generation_prompt:
            text += "<|im_start|>assistant\n"
        return self.encode(text) if tokenize else text


class TextStreamer:
    """Prints the text of row 0 as tokens arrive (pass as `streamer=` to generate)."""

    def __init__(self, tokenizer: BambooTokenizer, file=None):
        self.tokenizer, self.file = tokenizer, file or sys.stdout
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, tokens: torch.Tensor) -> None:
        self.ids.append(int(tokens.reshape(-1)[0]))
        text = self.tokenizer.decode(self.ids)
        self.file.write(text[self.printed:])
        self.file.flush()
        self.printed = len(text)
