"""Evaluation of language models: sliding-window perplexity for causal LMs, embedding fidelity for encoders."""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import SlimkitError

# model_type values of decoder-only families, for configs that name no architecture.
CAUSAL_TYPES = {"llama", "qwen2", "qwen3", "mistral", "mixtral", "opt", "bloom", "gpt2", "gpt_neox", "gptj", "gpt_neo",
                "phi", "phi3", "gemma", "gemma2", "gemma3_text", "falcon", "smollm3", "olmo", "olmo2", "stablelm"}
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def config_kind(config) -> str:
    """"causal" for a decoder-only LM config (its architectures, is_decoder or model_type say so), else "encoder"."""
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(CAUSAL_SUFFIXES) for a in archs) or getattr(config, "is_decoder", False):
        return "causal"
    return "causal" if getattr(config, "model_type", None) in CAUSAL_TYPES else "encoder"


def lm_kind(model: nn.Module) -> str:
    """"causal" or "encoder": how a transformers model is evaluated, by perplexity (a decoder with its language
    model head) or by the fidelity of its hidden states (encoders, and decoders without that head: a base model,
    a sequence classifier)."""
    if type(model).__name__.endswith(CAUSAL_SUFFIXES):
        return "causal"
    config = getattr(model, "config", None)
    if config is None:
        raise SlimkitError(f"{type(model).__name__} has no .config: lm_kind needs a Hugging Face transformers model")
    head = getattr(model, "get_output_embeddings", lambda: None)()
    vocab = getattr(config, "vocab_size", None)
    if config_kind(config) == "causal" and not (isinstance(head, nn.Linear) and head.out_features == vocab):
        return "encoder"
    return config_kind(config)


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window, the Hugging Face sliding-window convention."""
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        out.append((begin, end, max(prev_end, begin + 1)))  # a window's first token has no context: never scored
        prev_end = end
        if end == n:
            break
    return out


def sliding_nll(model: nn.Module, tokens: torch.Tensor, window: int = 2048, stride: int = 512,
                max_tokens: int | None = None, batch_size: int = 1, device=None,
                progress: bool = True) -> tuple[float, int]:
    """(summed NLL in nats, number of scored tokens) of a token stream, each token after the first scored once.

    Each window of `window` tokens starts `stride` after the previous one and scores only the tokens the previous
    window did not (the others are context). The NLL is summed in float32 from the model's logits.
    """
    tokens = torch.as_tensor(tokens)
    if tokens.dim() != 1 or tokens.dtype not in (torch.int64, torch.int32):
        raise SlimkitError(f"perplexity needs a 1-D integer token tensor, got {tuple(tokens.shape)} {tokens.dtype}")
    if window < 2 or stride < 1 or stride > window:
        raise SlimkitError(f"need window >= 2 and 1 <= stride <= window, got window={window}, stride={stride}")
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(max_pos, int) and 2 <= max_pos < window:
        window, stride = max_pos, min(stride, max_pos)
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2:
            raise SlimkitError(f"max_tokens must be an integer of at least 2 (tokens to score), got {max_tokens!r}")
        tokens = tokens[:max_tokens]
    if tokens.numel() < 2:
        raise SlimkitError(f"perplexity needs at least 2 tokens, got {tokens.numel()}")
    if device is not None:
        model.to(device)
    device = _model_device(model)
    keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters  # skip logits of context tokens
    use_cache = "use_cache" in inspect.signature(model.forward).parameters

    wins = _windows(tokens.numel(), window, stride)
    batches, i = [], 0  # consecutive windows of equal length, at most batch_size a batch
    while i < len(wins):
        j = i + 1
        while j < len(wins) and j - i < batch_size and wins[j][1] - wins[j][0] == wins[i][1] - wins[i][0]:
            j += 1
        batches.append(wins[i:j])
        i = j

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.inference_mode(), tqdm(total=len(wins), desc="perplexity", disable=not progress, leave=False) as bar:
            for batch in batches:
                x = torch.stack([tokens[b:e] for b, e, _ in batch]).to(device, torch.long)
                length = x.shape[1]
                keep = max(length - (s - b) + 1 for b, _, s in batch)  # logits from the one before the first scored
                kwargs = {"logits_to_keep": keep} if keep_arg else {}
                if use_cache:
                    kwargs["use_cache"] = False
                logits = model(input_ids=x, **kwargs).logits
                offset = length - logits.shape[1]  # positions of the logits kept
                for row, (b, e, s) in enumerate(batch):
                    first = s - b  # first scored position in the window
                    lg = logits[row, first - 1 - offset:length - 1 - offset].float()
                    total += F.cross_entropy(lg, x[row, first:], reduction="sum").item()
                    count += length - first
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return total, count


def perplexity(model: nn.Module, tokens: torch.Tensor, window: int = 2048, stride: int = 512,
               max_tokens: int | None = None, batch_size: int = 1, device=None, progress: bool = True) -> float:
    """exp(mean NLL) of a causal LM over a token stream, sliding windows as Hugging Face does (see sliding_nll).

    window is capped at model.config.max_position_embeddings; max_tokens keeps only the stream's beginning.
    """
    total, count = sliding_nll(model, tokens, window, stride, max_tokens, batch_size, device, progress)
    return math.exp(total / count)


def embed(model: nn.Module, batch: dict, pooling: str = "mean", batch_size: int = 64) -> torch.Tensor:
    """(N, H) float32 sentence embeddings on the CPU: the last hidden state mean-pooled over attention_mask.

    Works for base encoders (BertModel) and for models with a head (*ForMaskedLM, ...) through their hidden states.
    pooling: "mean" or "cls" (the first token).
    """
    if pooling not in ("mean", "cls"):
        raise SlimkitError(f"unknown pooling {pooling!r}: use 'mean' or 'cls'")
    if "input_ids" not in batch or "attention_mask" not in batch:
        raise SlimkitError("embed needs a batch with input_ids and attention_mask (see slimkit.text.encode_batch)")
    device = _model_device(model)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch]
    n = batch["input_ids"].shape[0]
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            for i in range(0, n, batch_size):
                part = {k: batch[k][i:i + batch_size].to(device) for k in keys}
                res = model(**part, output_hidden_states=True)
                h = getattr(res, "last_hidden_state", None)
                if h is None:
                    h = res.hidden_states[-1]
                h = h.float()
                if pooling == "cls":
                    out.append(h[:, 0].cpu())
                    continue
                m = part["attention_mask"].unsqueeze(-1).to(h.dtype)
                out.append(((h * m).sum(1) / m.sum(1).clamp(min=1.0)).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def embedding_cosine(model: nn.Module, reference_embeddings: torch.Tensor, batch: dict, pooling: str = "mean") -> float:
    """Mean cosine similarity between the model's embeddings of batch and reference ones (e.g. the FP model's)."""
    emb = embed(model, batch, pooling)
    ref = reference_embeddings.detach().float().cpu()
    if ref.shape != emb.shape:
        raise SlimkitError(f"reference embeddings have shape {tuple(ref.shape)} but the model gives "
                           f"{tuple(emb.shape)}: embed the same batch with the reference model")
    # in float64: a mean of values like 0.9999998 in float32 rounds to exactly 1.0, which reads as FP's own figure
    # (and at most 1: identical vectors give 1 + 2e-16 in float64)
    return F.cosine_similarity(emb.double(), ref.double(), dim=-1).clamp(max=1.0).mean().item()


def evaluate_lm(model: nn.Module, texts, tokenizer, reference: nn.Module | None = None, max_tokens: int = 20000,
                window: int = 512, stride: int = 256, n_sentences: int = 256, device=None, progress: bool = True,
                reference_embeddings: torch.Tensor | None = None) -> dict:
    """The report's metrics for a transformer on evaluation text: perplexity (causal LMs; sliding window over
    the first `max_tokens` tokens) or embedding cosine to `reference` (encoders, on `n_sentences` sentences),
    plus the storage size."""
    from .eval import model_size_bytes
    from .text import corpus_tokens, encode_batch, sentences

    out = {"size_bytes": model_size_bytes(model)}
    if lm_kind(model) == "causal":
        tokens = corpus_tokens(texts, tokenizer)
        out["ppl"] = perplexity(model, tokens, window=window, stride=stride, max_tokens=max_tokens, device=device,
                                progress=progress)
    elif reference is not None or reference_embeddings is not None:
        batch = encode_batch(tokenizer, sentences(texts, n_sentences, at_least=16), max_len=128)
        if reference_embeddings is None:
            reference_embeddings = embed(reference, batch)
        out["cosine"] = embedding_cosine(model, reference_embeddings, batch)
    return out
