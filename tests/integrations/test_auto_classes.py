"""`import bamboo` registers model type "bamboo" with transformers' Auto classes: the classes (transformers'
Mistral modules with the dReLU MLP) load bamboo's checkpoints with the logits of bamboo's own classes, and
AutoTokenizer encodes exactly like SentencePiece."""
import contextlib
import io
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("sentencepiece", reason="the tokenizer extra is not installed")
pytest.importorskip("mistral_common", reason="the tokenizer extra is not installed")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# transformers 5 names the loading dtype `dtype`; 4.x (the Bamboo remote code's 4.41) `torch_dtype`
DTYPE = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"

import bamboo  # noqa: E402,F401  (registers the Auto classes)
from bamboo.integrations.transformers import auto_classes  # noqa: E402
from bamboo.models import BambooForCausalLM, BambooForSequenceClassification, pretrained_path  # noqa: E402
from bamboo.models.tokenizer import BambooTokenizer  # noqa: E402

TEXTS = ["Hello world", " Hello world", "  two  spaces   ", "line one\nline two\n\n indented\n", "\ttab\n",
         "naïve café — 東京 😀 ünïcödé", "1234567 3.14159 2024-01-01", "<|im_start|>user\nHi<|im_end|>\n",
         "<s> and </s> are text here", "", " ", "It is a truth universally acknowledged, that a single man"]


@pytest.fixture(scope="module")
def tokenizer():
    return BambooTokenizer()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    """A tiny Bamboo with random, non-symmetric weights (norms and all), saved by bamboo with tokenizer files."""
    model = BambooForCausalLM.from_config("tiny", seed=3, num_hidden_layers=2, vocab_size=32000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp("tiny-bamboo")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _ids(n=12, batch=2, seed=0):
    return torch.randint(3, 32000, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("which", ["tiny", "austen-small"])
def test_auto_model_for_causal_lm_has_bamboos_logits(which, tiny_dir):
    directory = tiny_dir if which == "tiny" else pretrained_path()
    ours = BambooForCausalLM.from_pretrained(directory, dtype="float32")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory, **{DTYPE: torch.float32}).eval()
    assert type(theirs) is auto_classes.BambooForCausalLM
    assert all(type(layer.mlp) is auto_classes.BambooMLP for layer in theirs.model.layers)
    assert type(transformers.AutoConfig.from_pretrained(directory)) is auto_classes.BambooConfig
    ids = _ids()
    with torch.no_grad():
        expected, got = ours(ids), theirs(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if which == "austen-small":  # the checkpoint's bf16 weights, kept by dtype="auto"
        auto = transformers.AutoModelForCausalLM.from_pretrained(directory, **{DTYPE: "auto"})
        assert auto.dtype == torch.bfloat16


def test_auto_model_and_sequence_classification(tiny_dir):
    ours = BambooForCausalLM.from_pretrained(tiny_dir, dtype="float32")
    base = transformers.AutoModel.from_pretrained(tiny_dir, **{DTYPE: torch.float32}).eval()
    assert type(base) is auto_classes.BambooModel
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(base(ids).last_hidden_state, ours.model(ids), rtol=1e-5, atol=1e-5)

    # the classifier's score head is not in a causal-LM checkpoint: give both the same one; pad id 0 (<unk>), as
    # bamboo pads, so that transformers' classifier takes batches
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(
        tiny_dir, **{DTYPE: torch.float32}, num_labels=3, pad_token_id=0).eval()
    assert type(classifier) is auto_classes.BambooForSequenceClassification
    ref = BambooForSequenceClassification(ours.config.replace(num_labels=3, pad_token_id=0))
    ref.model.load_state_dict(ours.model.state_dict())
    ref.score.weight.data.copy_(classifier.score.weight.data)
    with torch.no_grad():
        torch.testing.assert_close(classifier(ids).logits, ref(ids), rtol=1e-5, atol=1e-5)
        padded, mask = ids.clone(), torch.ones_like(ids)
        padded[0, -4:], mask[0, -4:] = 0, 0  # right padding: both score the last real token
        torch.testing.assert_close(classifier(padded).logits, ref(padded, mask), rtol=1e-5, atol=1e-5)


def _texts():
    """transformers 4.x fast tokenizers ignore split_special_tokens: "<s>" written in a text is BOS there."""
    return TEXTS if DTYPE == "dtype" else [t for t in TEXTS if "<s>" not in t]


def test_auto_tokenizer_encodes_like_sentencepiece(tiny_dir, tokenizer):
    auto = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    assert type(auto) is auto_classes.BambooTokenizerFast
    for text in _texts():
        ids = auto(text)["input_ids"]
        assert ids == tokenizer.encode(text), text
        assert auto.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids) == tokenizer.sp.decode(ids[1:])
    batch = auto(["a", "a longer one"], return_tensors="pt", padding=True)
    ref = tokenizer(["a", "a longer one"])
    assert torch.equal(batch["input_ids"], ref["input_ids"]) and torch.equal(batch["attention_mask"], ref["attention_mask"])
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "How are you?"}]
    assert auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(messages)
    assert auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=False) == \
        tokenizer.apply_chat_template(messages, add_generation_prompt=False)


def test_the_bundled_checkpoint_ships_its_tokenizer(tokenizer):
    directory = pretrained_path()
    assert (directory / "tokenizer.model").read_bytes() == tokenizer.model_file.read_bytes()
    auto = transformers.AutoTokenizer.from_pretrained(directory)
    assert [auto(t)["input_ids"] for t in _texts()] == [tokenizer.encode(t) for t in _texts()]


@pytest.mark.parametrize("which", ["tiny", "austen-small"])
def test_doc_snippet_runs_verbatim_and_generates_bamboos_tokens(which, tiny_dir):
    path = str(tiny_dir if which == "tiny" else pretrained_path())
    out = io.StringIO()
    scope = {"path": path}
    with contextlib.redirect_stdout(out):
        exec(SNIPPET, scope)
    model, inputs, outputs = scope["model"], scope["inputs"], scope["outputs"]
    assert type(model) is auto_classes.BambooForCausalLM and type(scope["tokenizer"]) is auto_classes.BambooTokenizerFast
    assert out.getvalue().startswith("['") and outputs.shape[1] > inputs["input_ids"].shape[1]

    ours = BambooForCausalLM.from_pretrained(path, dtype=model.dtype)
    bamboo_tok = BambooTokenizer.from_pretrained(path)
    prompt = bamboo_tok([bamboo_tok.apply_chat_template([{"role": "user", "content": "..."}])])["input_ids"]
    assert torch.equal(prompt, inputs["input_ids"])
    expected = ours.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=2)
    assert torch.equal(outputs, expected[:, :outputs.shape[1]]), (outputs, expected)  # both: prompt, then new tokens


SNIPPET = '''
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(path, torch_dtype="auto", device_map="auto")
tokenizer = AutoTokenizer.from_pretrained(path)
messages = [{"role": "user", "content": "..."}]
prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
outputs = model.generate(**inputs, max_new_tokens=20, do_sample=False)
print(tokenizer.batch_decode(outputs, skip_special_tokens=True))
'''


def test_compile_finds_the_drelu_sites_of_the_transformers_class(tiny_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, **{DTYPE: torch.float32}).eval()
    ids = _ids(n=6)
    sites = bamboo.inspect(model, (ids,))
    assert len(sites) == model.config.num_hidden_layers and {s.kind for s in sites} == {"drelu"}
    opt = bamboo.compile(model, backend="eager", sparsity="exact")
    with torch.no_grad():
        torch.testing.assert_close(opt(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert [s.kind for s in opt.bamboo_report.sites] == ["drelu"] * model.config.num_hidden_layers
