"""Tiny randomly initialised Hugging Face models of every supported family, built offline from config classes."""
from __future__ import annotations

import torch
import transformers as T

FAMILY_MODELS = ("llama", "qwen2", "mistral", "opt", "bloom", "gpt2", "bert", "mpnet")
VOCAB = 96


def tiny_model(kind: str, seed: int = 0, layers: int = 2) -> torch.nn.Module:
    """A 2-block model with hidden size 32, norms and biases randomised so transforms have real work to do."""
    torch.manual_seed(seed)
    c = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
             intermediate_size=64, max_position_embeddings=128)
    build = {
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**c, num_key_value_heads=2)),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**c, num_key_value_heads=2)),
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**c, num_key_value_heads=2)),
        "opt": lambda: T.OPTForCausalLM(T.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers,
                                                    num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32,
                                                    max_position_embeddings=128, pad_token_id=1)),
        "bloom": lambda: T.BloomForCausalLM(T.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=layers, n_head=4,
                                                          bos_token_id=1, eos_token_id=2, pad_token_id=3)),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4,
                                                       n_positions=128, bos_token_id=1, eos_token_id=2)),
        "bert": lambda: T.BertModel(T.BertConfig(**c, pad_token_id=0)),
        "mpnet": lambda: T.MPNetModel(T.MPNetConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers,
                                                    num_attention_heads=4, intermediate_size=64,
                                                    max_position_embeddings=130, pad_token_id=1)),
    }[kind]
    model = build().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, module in model.named_modules():
            if "norm" in type(module).__name__.lower():
                w = getattr(module, "weight", None)
                if w is not None:  # gammas of both signs with a few large channels, as in real LLMs
                    w.copy_(torch.empty(w.shape).uniform_(0.3, 1.5, generator=g))
                    w[:3] *= 6.0
                    w[-1] *= -1.0
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.5)
    return model


def tiny_inputs(kind: str, batch: int = 2, length: int = 12, seed: int = 0, pad: bool = True) -> dict:
    """Random token ids and their attention mask; for encoders (pad=True) the second sequence ends in padding, as
    an evaluation batch may (calibration refuses padding: pad=False)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if kind in ("bert", "mpnet") and pad:
        mask[1, -3:] = 0  # padding in the second sequence
    return {"input_ids": ids, "attention_mask": mask}


def output(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


WORDS = ("the cat sat on a mat while dogs ran in parks and birds sang songs of blue seas "
         "we read books by fires as suns rose over green hills").split()


def tiny_tokenizer():
    """A word-level tokenizer over WORDS (fits VOCAB), built offline, with [EOS] and [PAD]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    t = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "[EOS]"]))
    return T.PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]",
                                     model_max_length=128)


def tiny_corpus(n_lines: int = 200, seed: int = 0) -> str:
    """Prose-like lines of WORDS (random, deterministic)."""
    g = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(n_lines):
        idx = torch.randint(len(WORDS), (int(torch.randint(6, 14, (1,), generator=g)),), generator=g)
        lines.append(" ".join(WORDS[i] for i in idx).capitalize() + ".")
    return "\n\n".join(lines)
