"""Text for calibration and evaluation: read files, tokenize to a stream or to random blocks, pick prose sentences.

Named corpora: "python-docs", the reStructuredText sources of the Python 3.11 documentation (Debian package
python3.11-doc), split by file into "calib" and "eval" (~10% of the files) with a stable hash of each path.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import os
import random
import re
import warnings
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .errors import SlimkitError

TEXT_SUFFIXES = (".txt", ".rst", ".md", ".py", ".text", ".tokens")  # also "x.rst.txt" and "x.txt.gz"
PYDOCS_DIR = Path("/usr/share/doc/python3.11/html/_sources")
PYDOCS_INSTALL = "install the Debian package python3.11-doc (apt-get install -y python3.11-doc, or `make data`)"
EVAL_PERCENT = 10  # share of a corpus's files held out for evaluation
PIECE_CHARS = 65536  # texts are tokenized in pieces of about this many characters, cut at line ends


def is_text_file(path: Path) -> bool:
    """Whether a file name looks like text slimkit reads (.txt, .rst, .md, .py, ..., and those gzipped)."""
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return name.endswith(TEXT_SUFFIXES)


UNDECODABLE = (0.01, 16)      # more than this share (and count) of a file's characters undecodable: not UTF-8 text


def _read(path: Path) -> str:
    """A text file's contents (UTF-8), gzipped or not. A few undecodable bytes are replaced (U+FFFD) with a
    warning; a corrupt or truncated .gz, an unreadable file, one holding NUL characters (binary, or UTF-16 text)
    or one that is not UTF-8 (over 1% of it, and over 16 characters, undecodable: Latin-1 text, binary data) is a
    SlimkitError naming it."""
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:     # gzip.BadGzipFile is an OSError; a cut-off .gz an EOFError
        raise SlimkitError(f"cannot read {path}: {e or type(e).__name__}; repair or remove it") from None
    text = raw.decode("utf-8", errors="replace")
    if "\0" in text:
        raise SlimkitError(f"{path} looks binary (it holds NUL characters; UTF-16 text does too): give UTF-8 text "
                           "files, or remove it")
    bad = text.count("\ufffd") - raw.count("\ufffd".encode())       # replacements, not U+FFFD the file holds
    if bad > max(UNDECODABLE[0] * len(text), UNDECODABLE[1]):
        raise SlimkitError(f"{path} is not UTF-8 text ({bad} of its {len(text)} characters do not decode): convert "
                           "it (e.g. iconv -f latin1 -t utf-8), or remove it")
    if bad:
        warnings.warn(f"{path}: {bad} byte sequence(s) that are not UTF-8 read as U+FFFD", stacklevel=2)
    return text


def text_files(folder: Path) -> list[Path]:
    """Text-like files under folder, recursively (symbolic links to folders followed, each real folder once, so
    a link loop ends), sorted by relative path; hidden files and folders skipped."""
    files, seen = [], set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            p = Path(root) / name
            if not name.startswith(".") and p.is_file() and is_text_file(p):
                files.append(p)
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def read_texts(source: str | Path | Sequence[str]) -> list[str]:
    """The texts of a file, of a folder's text files (recursive, sorted), or a list of strings; empty ones dropped."""
    if isinstance(source, (list, tuple)):
        if not all(isinstance(t, str) for t in source):
            raise SlimkitError("a list of texts must hold only strings")
        texts = [t for t in source if t.strip()]
        if not texts:
            raise SlimkitError("all the texts given are empty")
        return texts
    if not isinstance(source, (str, Path)):
        raise SlimkitError(f"text source must be a file, a folder or a list of strings, got {type(source).__name__}")
    path = Path(source).expanduser()
    try:
        exists = path.exists()
    except OSError:  # e.g. a long raw text taken for a file name
        exists = False
    if not exists:
        shown = str(source) if len(str(source)) <= 80 else str(source)[:77] + "..."
        raise SlimkitError(f"text source {shown!r} does not exist: give a file or folder, or pass raw text as a "
                           "list of strings")
    if path.is_dir():
        files = text_files(path)
        if not files:
            raise SlimkitError(f"{path} holds no text files ({', '.join(TEXT_SUFFIXES)}, or those .gz)")
    else:
        if not is_text_file(path) and b"\0" in path.open("rb").read(8192):
            raise SlimkitError(f"{path} looks binary: give a text file ({', '.join(TEXT_SUFFIXES)}, or those .gz)")
        files = [path]
    texts = [t for t in map(_read, files) if t.strip()]
    if not texts:
        raise SlimkitError(f"{path} holds only empty text files")
    return texts


def _pieces(text: str, size: int | None = None) -> Iterable[str]:
    """text cut into pieces of at most ~size characters, each ending at a line end where there is one."""
    size, start = size or PIECE_CHARS, 0
    while len(text) - start > size:
        cut = text.rfind("\n", start, start + size) + 1
        if cut <= start:
            cut = start + size
        yield text[start:cut]
        start = cut
    if start < len(text):
        yield text[start:]


@contextlib.contextmanager
def _quiet_tokenizer(tokenizer):
    """No "sequence length is longer than the maximum" warning: the stream is cut into windows afterwards."""
    loggers = [logging.getLogger("transformers.tokenization_utils_base")]
    levels = [lg.level for lg in loggers]
    flags = getattr(tokenizer, "deprecation_warnings", None)
    key = "sequence-length-is-longer-than-the-specified-maximum"
    had = flags.get(key) if isinstance(flags, dict) else None
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    if isinstance(flags, dict):
        flags[key] = True
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if isinstance(flags, dict):
            if had is None:
                flags.pop(key, None)
            else:
                flags[key] = had


def corpus_tokens(texts: Sequence[str], tokenizer, batch: int = 32) -> torch.Tensor:
    """The texts as one 1-D token stream, joined by the tokenizer's EOS token (or "\\n\\n" when it has none).

    No BOS or other special tokens are added. Long texts are tokenized in pieces cut at line ends, so memory
    stays modest; a token may split differently at such a cut than in one pass.
    """
    texts = read_texts(list(texts)) if not isinstance(texts, str) else read_texts([texts])
    eos_id = getattr(tokenizer, "eos_token_id", None)
    sep = [] if eos_id is None else [int(eos_id)]
    pieces: list[str | None] = []  # None: an EOS between texts
    for i, text in enumerate(texts):
        last = i == len(texts) - 1
        pieces.extend(_pieces(text if sep or last else text + "\n\n"))
        if sep and not last:
            pieces.append(None)
    out: list[torch.Tensor] = []
    with _quiet_tokenizer(tokenizer):
        for i in range(0, len(pieces), batch):
            chunk = pieces[i:i + batch]
            strs = [p for p in chunk if p is not None]
            ids = iter(tokenizer(strs, add_special_tokens=False)["input_ids"]) if strs else iter(())
            flat: list[int] = []
            for p in chunk:
                flat.extend(sep if p is None else next(ids))
            out.append(torch.tensor(flat, dtype=torch.long))
    return torch.cat(out)


def token_blocks(texts: Sequence[str], tokenizer, n_blocks: int, block_len: int, seed: int = 0) -> torch.Tensor:
    """(n_blocks, block_len) token windows at random offsets of the corpus stream (the GPTQ / OS+ convention).

    The same texts, tokenizer and seed give the same blocks; blocks may overlap.
    """
    if n_blocks < 1 or block_len < 1:
        raise SlimkitError(f"need n_blocks >= 1 and block_len >= 1, got {n_blocks} and {block_len}")
    ids = corpus_tokens(texts, tokenizer)
    if ids.numel() < block_len + 1:
        raise SlimkitError(f"the calibration text has {ids.numel()} tokens, too few for one sequence of "
                           f"{block_len} (plus one): give more text, or shorter sequences (seq_len, --seq-len)")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - block_len, (n_blocks,), generator=g)
    return ids[starts[:, None] + torch.arange(block_len)]


# --- sentences for encoder evaluation ---------------------------------------------------------------------------

_ROLE = re.compile(r":[\w:.+-]+:`([^`<]*?)(?:\s*<[^`>]*>)?`")          # :func:`name`, :ref:`text <target>`
_LINK = re.compile(r"`([^`<]+?)(?:\s*<[^`>]*>)?`__?")                  # `text <url>`_
_LITERAL = re.compile(r"``([^`]+)``")
_EMPH = re.compile(r"\*\*?([^*]+)\*\*?")
_BULLET = re.compile(r"^(?:[-*+•]|#\.|\d+[.)])\s+")
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_HEADING = re.compile(r"^([=\-~^\"'`#*+:.])\1{2,}\s*$")
_CODE_DIRECTIVE = re.compile(r"\.\. (code-block|code|sourcecode|highlight|literalinclude|doctest|testcode|testoutput|"
                             r"productionlist|raw|math|csv-table|list-table|table|grammar-snippet)::")
NOT_PROSE = ("..", ">>>", "$ ", "|", "+-", "+=", "%", "#!", "def ", "class ", "import ")  # paragraph starts
_MARKUP = set("`|<>{}[]=_\\#@$~^")


def _paragraphs(text: str) -> Iterable[str]:
    """Prose paragraphs: blank-line separated runs of lines, minus directives, literal/code blocks, tables, headings.

    A directive's indented content is kept (notes, function descriptions) unless the directive holds code.
    """
    para: list[str] = []
    literal_indent = None  # indentation of the paragraph that ended in "::", whose indented block is code
    for line in text.splitlines() + [""]:
        if line.strip():
            para.append(line)
            continue
        if not para:
            continue
        indent = len(para[0]) - len(para[0].lstrip())
        first = para[0].strip()
        in_literal = literal_indent is not None and indent > literal_indent
        if not in_literal:
            code = _CODE_DIRECTIVE.match(first) or (not first.startswith("..") and para[-1].rstrip().endswith("::"))
            literal_indent = indent if code else None
        skip = (in_literal or first.startswith(NOT_PROSE)
                or any(_HEADING.match(ln.strip()) for ln in para) or first.endswith(":"))
        if not skip:
            yield " ".join(_BULLET.sub("", ln.strip()) for ln in para)
        para = []


def _clean(paragraph: str) -> str:
    for pat in (_ROLE, _LINK, _LITERAL, _EMPH):
        paragraph = pat.sub(r"\1", paragraph)
    return re.sub(r"\s+", " ", paragraph).strip()


def _is_prose(s: str, min_words: int, max_words: int) -> bool:
    words = s.split()
    if not (min_words <= len(words) <= max_words) or not s[0].isupper() or s[-1] not in ".!?":
        return False
    if any(c in _MARKUP for c in s) or s.endswith("::") or "://" in s:
        return False
    letters = sum(c.isalpha() or c == " " for c in s)
    return letters >= 0.85 * len(s)


def sentences(texts: Sequence[str], n: int, min_words: int = 5, max_words: int = 40, seed: int = 0,
              at_least: int | None = None) -> list[str]:
    """n distinct prose sentences picked at random (deterministic in seed) from texts, skipping markup and code;
    with `at_least`, fewer than n (all there are) is accepted when at least that many are found."""
    seen, pool = set(), []
    for text in read_texts(list(texts)):
        for para in _paragraphs(text):
            for s in _SPLIT.split(_clean(para)):
                if s not in seen and _is_prose(s, min_words, max_words):
                    seen.add(s)
                    pool.append(s)
    if len(pool) < n and at_least is not None and len(pool) >= at_least:
        n = len(pool)
    if len(pool) < n:
        need = n if at_least is None else at_least
        raise SlimkitError(f"only {len(pool)} prose sentences of {min_words}-{max_words} words in the texts, at "
                           f"least {need} needed: give more text")
    return random.Random(seed).sample(pool, n)


def encode_batch(tokenizer, texts: Sequence[str], max_len: int = 128) -> dict[str, torch.Tensor]:
    """{"input_ids", "attention_mask"} of texts, truncated to max_len and right-padded to the longest."""
    if isinstance(texts, str) or not texts:
        raise SlimkitError("encode_batch needs a non-empty list of strings")
    ids = tokenizer(list(texts), truncation=True, max_length=max_len)["input_ids"]
    pad = next((t for t in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None))
                if t is not None), 0)
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, :len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


# --- named corpora ----------------------------------------------------------------------------------------------

def pydocs_dir() -> Path:
    """The Python docs sources: $SLIMKIT_PYDOCS_DIR, else the Debian python3.11-doc location."""
    return Path(os.environ.get("SLIMKIT_PYDOCS_DIR") or PYDOCS_DIR)


def path_score(relative_path: str) -> int:
    """A stable hash of a relative path in 0..99 (of its bytes: names need not be UTF-8)."""
    return int(hashlib.sha1(os.fsencode(relative_path)).hexdigest()[:8], 16) % 100


def is_eval_file(relative_path: str) -> bool:
    """Whether a corpus file is held out for evaluation: a stable hash of its relative path, ~EVAL_PERCENT%."""
    return path_score(relative_path) < EVAL_PERCENT


CORPORA = {"python-docs": pydocs_dir}
SPLITS = ("calib", "eval", "all")


def corpus_files(name: str, split: str = "all") -> list[Path]:
    """The files of a named corpus's split ("calib", "eval" or "all"), sorted; calib and eval are disjoint."""
    if name not in CORPORA:
        raise SlimkitError(f"unknown corpus {name!r}: named corpora are {', '.join(CORPORA)}")
    if split not in SPLITS:
        raise SlimkitError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    root = CORPORA[name]()
    if not root.is_dir():
        raise SlimkitError(f"the {name} corpus is missing ({root}): {PYDOCS_INSTALL}, or set SLIMKIT_PYDOCS_DIR")
    files = text_files(root)
    if not files:
        raise SlimkitError(f"{root} holds no text files: {PYDOCS_INSTALL}")
    if split == "all":
        return files
    want_eval = split == "eval"
    return [p for p in files if is_eval_file(p.relative_to(root).as_posix()) == want_eval]


@lru_cache(maxsize=4)
def _corpus(name: str, split: str, root: str) -> tuple[str, ...]:
    """Cached by root too, so a changed SLIMKIT_PYDOCS_DIR is seen."""
    return tuple(t for t in map(_read, corpus_files(name, split)) if t.strip())


def get_corpus(name: str, split: str = "all") -> list[str]:
    """The texts of a named corpus's split, one a file: "python-docs" with split "calib", "eval" or "all"."""
    root = str(CORPORA[name]()) if name in CORPORA else ""
    texts = list(_corpus(name, split, root))
    if not texts:
        raise SlimkitError(f"the {split} split of {name} holds only empty files")
    return texts
