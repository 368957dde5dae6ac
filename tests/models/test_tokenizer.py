import io

import pytest
import torch

pytest.importorskip("sentencepiece", reason="the tokenizer extra is not installed")
pytest.importorskip("mistral_common", reason="the tokenizer extra is not installed")

from bamboo.models.tokenizer import BambooTokenizer, TextStreamer  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return BambooTokenizer()


def test_mistral_vocabulary_and_special_ids(tok):
    assert tok.vocab_size == 32000
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)


def test_round_trip_keeps_the_leading_space(tok):
    """A leading space is a token of its own in Mistral's SentencePiece model (the fast Llama tokenizer built
    from the same file drops it): encoding keeps it and decoding gives it back."""
    ids = tok.encode(" Hello world")
    assert ids == [1, 28705, 22557, 1526]  # bos, "▁", "Hello", "▁world"
    assert tok.encode("Hello world") == [1, 22557, 1526]
    assert tok.decode(ids) == " Hello world"
    assert tok.decode(tok.encode("  two spaces")) == "  two spaces"
    assert tok.decode(tok.encode("It is a truth universally acknowledged")) == "It is a truth universally acknowledged"


def test_batch_is_left_padded(tok):
    batch = tok(["a", "a much longer sentence"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 2
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and bool(mask[1].all())
    assert ids[0, 0] == tok.pad_token_id


def test_chatml_template(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True) == tok.encode(text)
    with pytest.raises(ValueError, match="role"):
        tok.apply_chat_template([{"content": "Hi"}])


def test_streamer_prints_incrementally(tok):
    out = io.StringIO()
    streamer = TextStreamer(tok, file=out)
    for i in tok.encode("the quick brown fox", add_bos=False):
        streamer(torch.tensor([i]))
    assert out.getvalue() == "the quick brown fox"
