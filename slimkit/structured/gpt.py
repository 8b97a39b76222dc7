"""A small GPT: decoder-only, pre-norm, rotary or learned positions, GELU or SwiGLU feed-forward, tied embeddings.

Written to be read in one sitting (nanoGPT's shape). The feed-forward linears are named `mlp.fc1`, `mlp.fc2`
(and `mlp.gate` for SwiGLU) so that `slimkit.structured.replace_ffn` finds and swaps them for structured layers.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import numbers
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..core.data import check_token_ids
from ..errors import SlimkitError
from .kernels import eager_ffn, fused_ffn

FFN_ACTS = ("gelu", "gelu_tanh", "swiglu")
FFN_KERNELS = ("eager", "cublaslt")


@dataclass
class GPTConfig:
    """The shape of a GPT. d_ff=None means 4*d_model for GELU and 8/3*d_model (rounded up to 64) for SwiGLU,
    so both FFN kinds hold about the same parameters."""
    vocab_size: int = 8192
    n_layer: int = 6
    n_head: int = 6
    d_model: int = 384
    d_ff: Optional[int] = None
    seq_len: int = 256
    pos: str = "rope"          # "rope" | "learned"
    ffn: str = "gelu"          # "gelu" | "gelu_tanh" (GELU's tanh approximation) | "swiglu"
    norm: str = "layernorm"    # "layernorm" | "rmsnorm"
    tie_embeddings: bool = True
    dropout: float = 0.0
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        if self.pos not in ("rope", "learned"):
            raise SlimkitError(f"GPTConfig.pos must be 'rope' or 'learned', got {self.pos!r}")
        if self.ffn not in FFN_ACTS:
            raise SlimkitError(f"GPTConfig.ffn must be one of {', '.join(FFN_ACTS)}, got {self.ffn!r}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise SlimkitError(f"GPTConfig.norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "seq_len", "d_ff"):
            v = getattr(self, name)
            if name == "d_ff" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise SlimkitError(f"GPTConfig.{name} must be an integer, got {v!r}")
            if v < 1:
                raise SlimkitError(f"GPTConfig.{name} must be >= 1, got {v}")
        if isinstance(self.rope_base, bool) or not isinstance(self.rope_base, numbers.Real) \
                or not math.isfinite(self.rope_base) or self.rope_base <= 0:
            # base ** (2i / d) is what rotary frequencies divide by: 0, a negative or NaN base fills the tables with NaN
            raise SlimkitError(f"GPTConfig.rope_base must be a positive, finite number, got {self.rope_base!r}")
        if self.d_model % self.n_head:
            raise SlimkitError(f"d_model {self.d_model} is not divisible by n_head {self.n_head}: pick a head count "
                               "that divides it")
        if self.pos == "rope" and (self.d_model // self.n_head) % 2:
            raise SlimkitError(f"rotary positions need an even head size, got d_model/n_head = "
                               f"{self.d_model // self.n_head}")
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model if self.ffn != "swiglu" else 64 * math.ceil(8 * self.d_model / 3 / 64)
        if self.d_ff < 1:
            raise SlimkitError(f"GPTConfig.d_ff must be >= 1, got {self.d_ff}")
        if not isinstance(self.tie_embeddings, bool):     # a string such as "false" would tie silently
            raise SlimkitError(f"GPTConfig.tie_embeddings must be True or False, got {self.tie_embeddings!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real) \
                or not 0.0 <= self.dropout < 1.0:
            raise SlimkitError(f"GPTConfig.dropout must be a number in [0, 1), got {self.dropout!r}")


def rope_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of shape (seq_len, head_dim) for rotary embeddings, in the rotate-half layout."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) queries or keys by position: x*cos + rotate_half(x)*sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


def make_norm(cfg: GPTConfig) -> nn.Module:
    # RMSNorm's eps pinned to the value float32 (and bf16/fp16, computed in float32) use by default: left None it
    # follows the input's dtype, so a float64 copy of a model would compute a different function (2.2e-16)
    return nn.LayerNorm(cfg.d_model) if cfg.norm == "layernorm" else \
        nn.RMSNorm(cfg.d_model, eps=torch.finfo(torch.float32).eps)


class Attention(nn.Module):
    """Causal multi-head self-attention through F.scaled_dot_product_attention (flash kernels where available)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]],
                cache: Optional["KVCache"] = None, layer: int = 0) -> torch.Tensor:
        """x (B, T, C); rope: the (cos, sin) rows of x's positions, (T, head_dim) each, or None."""
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if rope is not None:        # q and k rotated together: one set of elementwise kernels for both
            (q, k), v = apply_rope(qkv[:2], *rope), qkv[2]
        else:
            q, k, v = qkv
        mask, causal = None, True
        if cache is not None and cache.static:     # the whole buffer, its unwritten and later positions masked
            k, v = cache.append(layer, k, v)
            mask, causal = cache.mask, False
        elif cache is not None:
            start = cache.length                   # the position of x's first token
            k, v = cache.append(layer, k, v)
            if start:               # query i sees every cached key and the new ones up to its own
                causal = False
                if T > 1:
                    mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=causal)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """The feed-forward block: fc2(gelu(fc1 x)) or fc2(silu(gate x) * fc1 x). Its linears are what replace_ffn swaps.
    `kernel` = "cublaslt" (set_ffn_kernel) runs a tanh-GELU FFN through fused_ffn(matmul="cublaslt"): GELU and
    GELU' in cuBLASLt matmul epilogues where they apply (CUDA, nvmath-python, fc1 ending in a dense factor), the
    same computation eagerly elsewhere. Either way two BlockShuffle linears keep the hidden activations
    feature-major between them (kernels.eager_ffn)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.swiglu = cfg.ffn == "swiglu"
        self.approximate = "tanh" if cfg.ffn == "gelu_tanh" else "none"
        self.kernel = "eager"
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        if self.swiglu:
            self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    @property
    def ffn_pair(self) -> tuple[str, str] | None:
        """The linears that run as one FFN (eager_ffn), for premerge to time together; none with SwiGLU."""
        return None if self.swiglu else ("fc1", "fc2")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.fc2(F.silu(self.gate(x)) * self.fc1(x))
        if self.kernel == "cublaslt":
            return fused_ffn(self.fc1, self.fc2, x, self.approximate, matmul="cublaslt")
        return eager_ffn(self.fc1, self.fc2, x, self.approximate)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm x), then x + mlp(norm x)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1, self.attn = make_norm(cfg), Attention(cfg)
        self.ln2, self.mlp = make_norm(cfg), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope, cache: Optional["KVCache"] = None, layer: int = 0) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), rope, cache, layer))
        return x + self.drop(self.mlp(self.ln2(x)))


class KVCache:
    """The keys and values of the tokens a GPT has read, per layer, so that each decoding step reads one new token
    (GPT.generate). Buffers for `max_len` tokens, made on first use in the keys' dtype (autocast's, if on).

    static=False: the new tokens' position is `length`, a Python int that GPT.forward advances; attention reads
    the keys written so far. static=True, for a decoding step captured once as a CUDA graph and replayed at every
    position: the position is `pos`, a (1,) long tensor on the model's device that the caller sets before each
    forward (GPT.forward neither reads `length` nor advances anything); keys and values are written at tensor
    positions and attention reads the whole zero-filled buffer, positions past each query masked. The caller keeps
    pos + tokens within max_len (an index past it fails in the write)."""

    def __init__(self, n_layer: int, max_len: int, static: bool = False):
        self.max_len, self.length, self.static = max_len, 0, static
        self.pos: Optional[torch.Tensor] = None
        self.where: Optional[torch.Tensor] = None     # static: this forward's positions and mask (start)
        self.mask: Optional[torch.Tensor] = None
        self.k: list[Optional[torch.Tensor]] = [None] * n_layer
        self.v: list[Optional[torch.Tensor]] = [None] * n_layer

    def start(self, t: int) -> torch.Tensor:
        """static, at the start of a forward of t new tokens: their positions, (t,) long, and `mask`, which cached
        positions each of them sees ((t, max_len) bool: itself and those before), made once for every layer."""
        if self.pos is None:
            raise SlimkitError("a static KVCache reads the new tokens' position from cache.pos: set it to a (1,) "
                               "long tensor on the model's device before the forward")
        self.where = self.pos + torch.arange(t, device=self.pos.device)
        self.mask = torch.arange(self.max_len, device=self.pos.device) <= self.where[:, None]
        return self.where

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer's keys and values (B, H, T, D) of the new tokens at their positions and return all of them
        so far (static: the whole buffers); GPT.forward advances length once every layer has stored."""
        if self.k[layer] is None:
            shape = (*k.shape[:2], self.max_len, k.shape[3])
            new = k.new_zeros if self.static else k.new_empty     # static: read whole, so no NaN in unwritten rows
            self.k[layer], self.v[layer] = new(shape), new(shape, dtype=v.dtype)
        if self.static:                  # at the positions of this forward's start()
            self.k[layer].index_copy_(2, self.where, k)
            self.v[layer].index_copy_(2, self.where, v)
            return self.k[layer], self.v[layer]
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class GPT(nn.Module):
    """Decoder-only language model. forward(idx, targets) -> (logits, mean cross-entropy or None)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.pos == "rope":
            cos, sin = rope_tables(cfg.seq_len, cfg.d_model // cfg.n_head, cfg.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)
        # GPT-2: residual projections scaled down by depth so the residual stream's variance stays ~constant
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.fc2.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None):
        """Logits for idx (B, T), and the mean cross-entropy against targets if given. With a KVCache (see
        generate), idx continues the tokens the cache holds: positions start at cache.length, attention reads the
        cached keys and values too, and the cache takes idx's."""
        B, T = idx.shape
        static = cache is not None and cache.static
        if static:          # positions from a tensor: no host-side check (that would synchronise); see KVCache
            where = cache.start(T)
            if cache.max_len > self.cfg.seq_len:
                raise SlimkitError(f"a static KV cache of {cache.max_len} tokens is longer than the model's seq_len "
                                   f"{self.cfg.seq_len}: make it at most that long")
        else:
            start = cache.length if cache is not None else 0
            if start + T > self.cfg.seq_len:
                raise SlimkitError(f"sequence of {start + T} tokens is longer than the model's seq_len "
                                   f"{self.cfg.seq_len}")
            if cache is not None and start + T > cache.max_len:
                raise SlimkitError(f"the KV cache holds {cache.max_len} tokens; {start + T} would not fit: make it "
                                   "longer")
            where = slice(start, start + T)
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(where if static else torch.arange(start, start + T, device=idx.device))
        rope = (self.rope_cos[where], self.rope_sin[where]) if self.cfg.pos == "rope" else None
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, cache, i)
        if cache is not None and not static:
            cache.length += T
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, vocab_size: Optional[int] = None,
                 cuda_graph: Optional[bool] = None) -> torch.Tensor:
        """idx (B, T) followed by max_new_tokens sampled tokens, (B, T + max_new_tokens). The prompt is read once
        into a KVCache and each new token is one forward of B tokens (premerge applies at that token count).

        cuda_graph (default: whether the model is on CUDA): each step after the first replays one CUDA graph of a
        forward over a static KVCache (tensor positions, the whole cache read under a mask) that also samples the
        next token and advances the position (_GraphDecoder): the host launches one graph a token (and draws the
        step's noise when sampling) instead of every kernel, and the structured FFNs' small-token kernels run
        there. The graph is kept for later calls of the same batch size, cache length (prompt plus new tokens
        rounded up to a multiple of GRAPH_LEN_STEP) and sampling settings while the model's modules and parameter
        storage stay the same (in-place weight updates are seen); another shape or setting, a module or
        parameter replaced (premerge, .to()), or a module's plain attribute (a self-guided share) or forward hook
        changed, captures anew and frees the old one, as does release_decode_graph().
        On the CPU the same static-cache step runs eagerly. False: eager steps over a cache read up to its length.
        Both sample alike: the Gumbel-max trick with uniform noise drawn from `generator` a step (see _pick).

        temperature 0 takes the most likely token (greedy); top_k keeps the k most likely before sampling;
        generator seeds the sampling; vocab_size: new tokens only from ids below it (the tokenizer's size, where
        the model's vocabulary is padded past it, as train-lm pads to a multiple of 64). Runs in eval mode (the
        mode is restored after). Prompt plus new tokens must fit the model's seq_len."""
        check_token_ids(self.cfg.vocab_size, idx, "generate: the prompt's token ids")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
            raise SlimkitError(f"generate: max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
                or not math.isfinite(temperature) or temperature < 0:
            raise SlimkitError(f"generate: temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
            raise SlimkitError(f"generate: top_k must be a positive integer or None, got {top_k!r}")
        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral)
                                       or not 1 <= vocab_size <= self.cfg.vocab_size):
            raise SlimkitError(f"generate: vocab_size must be an integer in [1, {self.cfg.vocab_size}] or None, got "
                               f"{vocab_size!r}")
        total = idx.shape[1] + max_new_tokens
        if total > self.cfg.seq_len:
            raise SlimkitError(f"generate: {idx.shape[1]} prompt tokens + {max_new_tokens} new ones exceed the model's "
                               f"seq_len {self.cfg.seq_len}: shorten the prompt or ask for fewer tokens")
        device = self.tok_emb.weight.device
        if generator is not None and generator.device.type != device.type:
            raise SlimkitError(f"generate: the generator is on {generator.device}, the model on {device}: make it with "
                               f"torch.Generator(device={str(device)!r})")
        if cuda_graph is None:
            cuda_graph = device.type == "cuda"
        elif not isinstance(cuda_graph, bool):
            raise SlimkitError(f"generate: cuda_graph must be True, False or None, got {cuda_graph!r}")
        was_training = self.training
        self.eval()
        try:
            idx = idx.to(device=device, dtype=torch.long)      # ids on the model's device, wherever given
            if not max_new_tokens:
                return idx.clone()          # a new tensor, as when tokens are added
            batch, vocab = idx.shape[0], vocab_size or self.cfg.vocab_size

            def pick(logits: torch.Tensor) -> torch.Tensor:
                noise = _noise(temperature, (batch, vocab), device, generator)
                return _pick(logits[:, -1, :vocab].float(), temperature, top_k, noise)
            # a kept graph's tensors are ordinary ones, made and used outside inference mode
            with torch.inference_mode(False) if cuda_graph else contextlib.nullcontext(), torch.no_grad():
                if cuda_graph:
                    dec = _decoder(self, batch, total, device, temperature, top_k, vocab)
                    cache = dec.cache
                    cache.pos = dec.pos.zero_()
                else:
                    cache = KVCache(self.cfg.n_layer, total)
                out = [idx, pick(self(idx, cache=cache)[0])]              # the prompt, eagerly
                if cuda_graph:
                    dec.tok.copy_(out[-1])
                    dec.pos.fill_(idx.shape[1])
                    out += [dec.step(generator) for _ in range(max_new_tokens - 1)]
                else:
                    for _ in range(max_new_tokens - 1):
                        out.append(pick(self(out[-1], cache=cache)[0]))
                return torch.cat(out, dim=1)
        finally:
            self.train(was_training)

    def release_decode_graph(self) -> None:
        """Free the CUDA graph and static KV cache that generate(cuda_graph=True) keeps for its next call."""
        _DECODE_GRAPHS.pop(self, None)

    def num_params(self, non_embedding: bool = False) -> int:
        """Distinct parameters (a tied embedding counted once). non_embedding: leave out the input embeddings
        (token table unless tied to the output head, and learned positions): those are look-ups, not matmuls."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.tok_emb.weight.numel()
        return n

    def matmul_params(self) -> int:
        """Weights used in matmuls, once per token each: num_params(non_embedding=True) less the norms."""
        norms = sum(p.numel() for m in self.modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm))
                    for p in m.parameters(recurse=False))
        return self.num_params(non_embedding=True) - norms

    def attention_flops_per_token(self, seq_len: Optional[int] = None) -> int:
        """Training FLOPs per token of attention's score and weighted-sum products: 12 * n_layer * seq_len * d_model
        (forward 2 * 2 * T * d per layer, times 3 for forward + backward), counted over the full T x T square:
        the causal mask's skipped half is not subtracted (PaLM's convention)."""
        return 12 * self.cfg.n_layer * (seq_len or self.cfg.seq_len) * self.cfg.d_model

    def flops_per_token(self, seq_len: Optional[int] = None) -> int:
        """Training FLOPs per token, the 6N + attention convention (Kaplan et al. 2020; PaLM appendix B; nanoGPT).

        6N: forward 2 FLOPs per weight per token (multiply + add), backward twice that, with N = matmul_params()
        (the output head counts; embedding look-ups and norms do not). Plus attention_flops_per_token(). Structured
        FFN layers count the same way (each of their weights is used once per token), so this equals
        slimkit.structured.train_flops_per_token(model) + attention_flops_per_token() while no dense self-guided
        guide is active; the trainer uses that sum, which also counts active guides.
        """
        return 6 * self.matmul_params() + self.attention_flops_per_token(seq_len)


GRAPH_LEN_STEP = 256     # generate's static KV cache length: prompt + new tokens rounded up to a multiple of this
_DECODE_GRAPHS: "weakref.WeakKeyDictionary[GPT, tuple]" = weakref.WeakKeyDictionary()   # model -> its decoder


class _GraphDecoder:
    """generate's steps after the prompt over a static KVCache, one CUDA graph a step: the graph reads the
    current token and position from static tensors (tok, pos), samples the next token from the logits with the
    step's noise (drawn before each replay with the caller's generator, outside the graph) and writes it to tok,
    and advances pos; so a step costs the host one replay (and one noise draw when sampling). On the CPU the same
    step runs eagerly. It holds the GPT weakly, so that a kept decoder does not keep its model alive."""

    def __init__(self, gpt: GPT, batch: int, max_len: int, device: torch.device, temperature: float,
                 top_k: Optional[int], vocab: int):
        self.gpt = weakref.ref(gpt)
        self.cache = KVCache(gpt.cfg.n_layer, max_len, static=True)
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.noise = None if temperature == 0 else torch.zeros(batch, vocab, device=device)
        self.temperature, self.top_k, self.vocab = temperature, top_k, vocab
        self.graph: Optional[torch.cuda.CUDAGraph] = None

    def _step(self) -> None:
        self.cache.pos = self.pos
        logits = self.gpt()(self.tok, cache=self.cache)[0][:, -1, :self.vocab].float()
        self.tok.copy_(_pick(logits, self.temperature, self.top_k, self.noise))
        self.pos.add_(1)

    def step(self, generator: Optional[torch.Generator]) -> torch.Tensor:
        """The next tokens (B, 1), from tok at position pos."""
        if self.noise is not None:
            self.noise.uniform_(generator=generator)
        if self.tok.device.type != "cuda":
            self._step()
        else:
            if self.graph is None:      # the warm-up's step is undone (its cache writes are the replay's own)
                from .decode import capture
                saved = self.tok.clone(), self.pos.clone()
                with torch.cuda.device(self.tok.device):
                    self.graph, _ = capture(self._step, warmup=1, after_warmup=lambda: (
                        self.tok.copy_(saved[0]), self.pos.copy_(saved[1])))
            self.graph.replay()
        return self.tok.clone()


def _settings(m: nn.Module) -> tuple:
    """A module's plain attributes and forward hooks: a capture bakes in the Python numbers a forward reads (a
    self-guided layer's share, which set_progress changes in place) and the path they and hooks choose (an FFN's
    kernel; eager_ffn's fused paths only without hooks), so a change to any of them must capture anew."""
    return (tuple((k, v) for k, v in vars(m).items() if isinstance(v, (bool, int, float, str))),
            tuple(map(id, m._forward_pre_hooks.values())), tuple(map(id, m._forward_hooks.values())))


def _graph_key(gpt: GPT, batch: int, max_len: int, device: torch.device, *sampling) -> tuple:
    """What a kept decoder depends on: the shapes, the sampling settings, the autocast dtype, and which modules
    (and their settings and hooks, global ones too) and which parameter and buffer storage its graph read when
    it was captured."""
    from torch.nn.modules import module as M
    amp = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    modules = list(gpt.modules())
    hooks = tuple(tuple(map(id, getattr(M, name, {}).values()))
                  for name in ("_global_forward_pre_hooks", "_global_forward_hooks"))
    return (batch, max_len, device, amp, *sampling, tuple(map(id, modules)), tuple(map(_settings, modules)), hooks,
            tuple((t.data_ptr(), t.dtype, t.shape) for t in itertools.chain(gpt.parameters(), gpt.buffers())))


def _decoder(gpt: GPT, batch: int, total: int, device: torch.device, temperature: float, top_k: Optional[int],
             vocab: int) -> _GraphDecoder:
    """generate's _GraphDecoder, kept for the next call with the same key (_graph_key). Its cache is zeroed
    first: an earlier call's keys and values sit past each query's position, masked, but a mask does not stop an
    inf or NaN among them (one overflowed call's) from turning every later call's attention into NaN."""
    max_len = min(gpt.cfg.seq_len, -(-total // GRAPH_LEN_STEP) * GRAPH_LEN_STEP)
    key = _graph_key(gpt, batch, max_len, device, temperature, top_k, vocab)
    kept = _DECODE_GRAPHS.get(gpt)
    if kept is not None and kept[0] == key:
        for t in kept[1].cache.k + kept[1].cache.v:
            if t is not None:
                t.zero_()
        return kept[1]
    _DECODE_GRAPHS.pop(gpt, None)           # the old graph and cache freed before new ones are made
    dec = _GraphDecoder(gpt, batch, max_len, device, temperature, top_k, vocab)
    _DECODE_GRAPHS[gpt] = (key, dec)
    return dec


def _noise(temperature: float, shape: tuple, device: torch.device,
           generator: Optional[torch.Generator]) -> Optional[torch.Tensor]:
    """A sampling step's uniform noise (None for greedy), drawn as _GraphDecoder.step draws it."""
    return None if temperature == 0 else torch.zeros(shape, device=device).uniform_(generator=generator)


def _pick(logits: torch.Tensor, temperature: float, top_k: Optional[int],
          noise: Optional[torch.Tensor]) -> torch.Tensor:
    """Next tokens (B, 1) from last-position logits (B, V): the most likely at temperature 0, else sampled from
    softmax(logits / temperature) over the top_k most likely (all if None), by the Gumbel-max trick with noise,
    uniform in [0, 1) (B, V): argmax(logits / t - log(-log u)) is distributed as that softmax, and takes no
    host synchronisation, so it runs inside a CUDA graph (multinomial's sampling does not capture with a
    caller's generator). Shifted by the max first: at a tiny t the largest logit stays finite and wins."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    gumbel = -torch.log(-torch.log(noise))
    return ((logits - logits.amax(dim=-1, keepdim=True)) / temperature + gumbel).argmax(dim=-1, keepdim=True)


def set_ffn_kernel(model: nn.Module, kernel: str) -> nn.Module:
    """Run every GPT feed-forward block of model eagerly ("eager") or through cuBLASLt's GELU epilogues
    ("cublaslt", GPUs with nvmath-python; needs GPTConfig.ffn = "gelu_tanh", the GELU those epilogues compute).
    The parameters and the function are unchanged, so a checkpoint trained one way resumes the other."""
    if kernel not in FFN_KERNELS:
        raise SlimkitError(f"ffn kernel must be one of {', '.join(FFN_KERNELS)}, got {kernel!r}")
    for m in model.modules():
        if isinstance(m, MLP):
            if kernel == "cublaslt" and (m.swiglu or m.approximate != "tanh"):
                raise SlimkitError("the cublaslt FFN kernel fuses GELU's tanh approximation only: train with "
                                   "--act gelu_tanh (GPTConfig.ffn='gelu_tanh')")
            m.kernel = kernel
    return model
