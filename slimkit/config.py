"""The quantization config: one dataclass whose fields are exactly what a recipe (YAML) or the CLI can set."""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from .core.observers import OBSERVERS
from .core.quantizer import GRANULARITIES
from .errors import SlimkitError

PRESETS = {
    # The paper's settings (QDrop's public configs): 1024 samples, batch 32, 20000 iterations a block.
    "paper": {"num_samples": 1024, "batch_size": 32, "iters": 20000},
    # A few minutes on a laptop CPU for small CNNs; what the demo uses.
    "demo": {"num_samples": 1024, "batch_size": 32, "iters": 500},
    # Seconds: for tests and smoke runs.
    "fast": {"num_samples": 128, "batch_size": 16, "iters": 100, "act_calib_samples": 64},
}


RECONSTRUCTION_METHODS = ("adaround", "brecq", "qdrop")
RECONSTRUCTION_FIELDS = ("batch_size", "iters", "lr_round", "lr_act", "round_weight", "warmup", "compile", "cuda_graph")
TRANSFORMER_ONLY = ("seq_len", "lm_batch_size", "alpha", "attn_quant", "search_steps", "twc_iters", "token_clipping")
# the fields the transformer path reads, and those only one of its methods reads
TRANSFORMER_FIELDS = ("method", "w_bits", "a_bits", "w_granularity", "w_symmetric", "w_group_size", "a_granularity",
                      "a_symmetric", "w_observer", "a_observer", "skip", "preset", "num_samples", "seq_len",
                      "lm_batch_size", "attn_quant", "seed", "device")
METHOD_FIELDS = {"smoothquant": ("alpha",), "os_plus": ("search_steps", "token_clipping", "twc_iters", "lr_act"),
                 "outlier_suppression": ("twc_iters", "lr_act")}
# the fields only activation quantization reads (a_bits None: weight-only)
ACTIVATION_FIELDS = ("a_observer", "a_symmetric", "a_granularity", "lr_act", "twc_iters", "token_clipping")
# (QDrop's drop_prob / drop_inputs stay read without activation bits: its reconstruction still mixes float and
# quantized block inputs)
# Defaults a method changes (below a preset's, a recipe's and explicit values): min-max is what the baseline
# named so computes; Outlier Suppression's fine-grained clipping learns its steps at lr 1e-5, the public
# code's (ptq_glue_quant.py's learn: lr), where QDrop's 4e-5 would overshoot the coarse range; OS+ with
# token_clipping runs that same clipping.
METHOD_DEFAULTS = {"minmax": {"w_observer": "minmax", "a_observer": "minmax"},
                   "outlier_suppression": {"lr_act": 1e-5}, "os_plus": {"lr_act": 1e-5}}


@dataclass
class QuantConfig:
    method: str = "qdrop"
    w_bits: int = 4
    a_bits: int | None = 4  # None keeps activations in float (weight-only quantization)
    w_granularity: str = "channel"
    w_symmetric: bool = False
    w_group_size: int = 128
    a_granularity: str = "tensor"
    a_symmetric: bool = False
    w_observer: str = "mse"
    a_observer: str = "mse"
    first_last_bits: int | None = 8  # the first and last layer's bits; None or 0: same as the others
    skip: list[str] = field(default_factory=list)  # layer paths kept in float
    fold_bn: bool = True
    blocks: list[str] | None = None  # override the adapter's reconstruction blocks (module paths)
    # calibration and reconstruction
    preset: str | None = None
    num_samples: int | None = None  # calibration samples; default 1024 images (CNNs) or 128 sequences (transformers)
    act_calib_samples: int = 256
    batch_size: int = 32
    iters: int = 20000
    drop_prob: float = 0.5  # QDrop: probability that an activation element keeps its quantized value
    drop_inputs: bool = True  # QDrop: also mix each block's quantized-prefix input with its float input
    lr_round: float = 1e-3
    lr_act: float = 4e-5
    round_weight: float = 0.01
    warmup: float = 0.2
    device: str | None = None  # "cuda", "cpu"; default: CUDA when available
    compile: bool | None = None  # torch.compile the activation fake-quant; default: on the CPU for >= 500 iterations
    cuda_graph: bool = True  # on CUDA, replay each reconstruction iteration as a CUDA graph
    # transformers (slimkit.transformer)
    seq_len: int | None = None  # tokens per calibration sequence; default 2048 (causal LMs) or 128 (encoders),
    # at most the model's context
    lm_batch_size: int = 4  # calibration sequences per forward pass
    alpha: float = 0.5  # SmoothQuant's migration strength
    attn_quant: bool = False  # also quantize the attention matmul inputs (Q, K, V) at a_bits
    search_steps: int = 100  # OS+: candidate clipping thresholds (at least; the paper's grid)
    twc_iters: int = 100  # Outlier Suppression: fine-grained clipping-range learning, iterations a block
    token_clipping: bool = False  # OS+: set activation ranges by Outlier Suppression's token-wise clipping
    seed: int = 0
    progress: bool = True

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def build(cls, recipe: str | Path | dict | None = None, **overrides) -> "QuantConfig":
        """Defaults, overridden by the preset's fields, then the recipe's, then explicit ones."""
        values: dict = {}
        if recipe is not None:
            values.update(load_recipe(recipe))
        from_recipe = set(values)
        values.update(overrides)
        unknown = sorted(set(values) - set(cls.fields()))
        if unknown:
            raise SlimkitError(f"unknown option {unknown[0]!r}; known options: {', '.join(cls.fields())}")
        preset = values.get("preset")
        if preset is not None:
            if not isinstance(preset, str) or preset not in PRESETS:
                raise SlimkitError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
            values = {**PRESETS[preset], **values}
        method = values.get("method", cls.method)
        if isinstance(method, str):
            values = {**METHOD_DEFAULTS.get(method, {}), **values}
        if values.get("first_last_bits") == 0:
            values["first_last_bits"] = None  # 0: the first and last layer get the same bits as the others
        for name in ("skip", "blocks"):    # one path given as a string: a list of one, not of its characters
            if isinstance(values.get(name), str):
                values[name] = [values[name]]
        cfg = cls(**values)
        cfg.validate()
        cfg._given = {"recipe": from_recipe - set(overrides), "options": set(overrides)}
        return cfg

    def unread(self, transformer: bool) -> dict[str, list[str]]:
        """The settings given (by the recipe, by options) that this method never reads on this kind of model:
        {"recipe": [...], "options": [...]}. Reconstruction settings for rtn, a group size without group
        granularity, transformer settings on a CNN and CNN ones on a transformer."""
        read = set(self.applied(transformer)) | {"preset", "progress"}
        if self.w_granularity != "group":
            read.discard("w_group_size")
        if self.method == "os_plus" and not self.token_clipping:     # the clipping's own settings
            read -= {"twc_iters", "lr_act"}
        given = getattr(self, "_given", {})
        return {where: sorted(k for k in given.get(where, ()) if k not in read) for where in ("recipe", "options")}

    def _check_types(self) -> None:
        """Every field holds a value of its annotated type (a recipe's "no" is no bool, "8" no int)."""
        kinds = {"int": (numbers.Integral,), "float": (numbers.Real,), "bool": (bool,), "str": (str,),
                 "None": (type(None),), "list[str]": (list, tuple)}
        if isinstance(self.device, torch.device):      # pick_device takes one as well as its name
            self.device = str(self.device)
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            allowed = [t.strip() for t in str(f.type).split("|")]
            ok = any(isinstance(v, kinds[t]) and not (isinstance(v, bool) and t in ("int", "float"))
                     for t in allowed if t in kinds)
            if not ok:
                want = " or ".join("none" if t == "None" else "a list of names" if t == "list[str]" else
                                   {"int": "an integer", "float": "a number", "bool": "true/false",
                                    "str": "a string"}.get(t, t) for t in allowed)
                raise SlimkitError(f"{f.name} must be {want}, got {v!r}")

    def validate(self) -> None:
        from .methods import METHODS, TRANSFORMER_METHODS

        self._check_types()

        if self.method not in METHODS and self.method not in TRANSFORMER_METHODS:
            raise SlimkitError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)} (CNNs) or "
                               f"{', '.join(TRANSFORMER_METHODS)} (transformers)")
        for name in ("w_bits", "a_bits", "first_last_bits"):
            bits = getattr(self, name)
            if bits is None and name != "w_bits":
                continue
            if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
                off = {"a_bits": " (null keeps activations in float: weight-only quantization)",
                       "first_last_bits": " (null leaves the first and last layers at w_bits / a_bits)"}
                raise SlimkitError(f"{name} must be an integer from 2 to 8, got {bits!r}{off.get(name, '')}")
        for name in ("w_granularity", "a_granularity"):
            if getattr(self, name) not in GRANULARITIES:
                raise SlimkitError(f"{name} must be one of {', '.join(GRANULARITIES)}, got {getattr(self, name)!r}")
        if self.w_granularity == "token":
            raise SlimkitError("w_granularity 'token' is for activations: weights are quantized per channel, per "
                               "tensor or per group")
        if self.a_granularity == "group":
            raise SlimkitError("a_granularity 'group' is for weights: activations are quantized per tensor "
                               "(static), per token (dynamic) or, in CNNs, per channel")
        for name in ("w_observer", "a_observer"):
            if getattr(self, name) not in OBSERVERS:
                raise SlimkitError(f"{name} must be one of {', '.join(OBSERVERS)}, got {getattr(self, name)!r}")
        if not 0.0 < self.drop_prob <= 1.0:
            raise SlimkitError(f"drop_prob must be in (0, 1], got {self.drop_prob}")
        for name in ("num_samples", "batch_size", "act_calib_samples", "lm_batch_size", "search_steps", "seq_len"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SlimkitError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.iters < 0:
            raise SlimkitError(f"iters must be non-negative, got {self.iters}")
        if self.iters == 0 and self.method in RECONSTRUCTION_METHODS:
            raise SlimkitError(f"{self.method} learns by block reconstruction and needs iters of at least 1; "
                               "to round to nearest without reconstruction use method rtn")
        for name in ("lr_round", "lr_act"):
            if not 0 < getattr(self, name) < math.inf:
                raise SlimkitError(f"{name} must be a finite number above 0, got {getattr(self, name)}")
        if not 0 <= self.round_weight < math.inf:
            raise SlimkitError(f"round_weight must be a finite number, 0 or above, got {self.round_weight}")
        if self.twc_iters < 0:
            raise SlimkitError(f"twc_iters must be non-negative, got {self.twc_iters}")
        if not 0.0 <= self.warmup < 1.0:
            raise SlimkitError(f"warmup is a share of the iterations, in [0, 1), got {self.warmup}")
        if not 0.0 <= self.alpha <= 1.0:
            raise SlimkitError(f"alpha (SmoothQuant's migration strength) must be in [0, 1], got {self.alpha}")
        if isinstance(self.w_group_size, bool) or not isinstance(self.w_group_size, int) or self.w_group_size < 1:
            raise SlimkitError(f"w_group_size must be a positive integer, got {self.w_group_size!r}")
        for name in ("skip", "blocks"):
            paths = getattr(self, name)
            if paths is not None and (not isinstance(paths, (list, tuple)) or
                                      not all(isinstance(p, str) for p in paths)):
                raise SlimkitError(f"{name} must be a list of module paths, got {paths!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def applied(self, transformer: bool = False) -> dict:
        """The settings this config's method reads, for its manifest. A transformer run: the transformer fields and
        its method's own (no BN folding, first/last-layer bits or reconstruction). A CNN run: no transformer-only
        settings, and the reconstruction ones (iterations, learning rates, QDrop's drop) only for methods that
        reconstruct."""
        full = self.to_dict()
        no_acts = set() if self.a_bits is not None else set(ACTIVATION_FIELDS)   # weight-only: nothing of these
        if transformer:
            return {k: full[k] for k in TRANSFORMER_FIELDS + METHOD_FIELDS.get(self.method, ()) if k not in no_acts}
        skip = set(TRANSFORMER_ONLY) | no_acts
        if self.method not in RECONSTRUCTION_METHODS:
            skip |= set(RECONSTRUCTION_FIELDS) | {"drop_prob", "drop_inputs", "blocks"}
        elif self.method != "qdrop":
            skip |= {"drop_prob", "drop_inputs"}
        if self.method == "adaround":       # layer by layer, weights only learned
            skip |= {"lr_act", "blocks"}
        return {k: v for k, v in full.items() if k not in skip}


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.1's safe loader, reading numbers in exponent form without a dot (1e-3, 2E5) as floats, as YAML 1.2
    and Python do (1.1 reads them as strings, so `lr_round: 1e-3` was refused as a string)."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def load_recipe(recipe: str | Path | dict) -> dict:
    """A recipe is a mapping of QuantConfig fields: a dict, a YAML file, or the name of a shipped recipe."""
    if isinstance(recipe, dict):
        return dict(recipe)
    if not isinstance(recipe, (str, Path)):
        raise SlimkitError(f"recipe must be a dict of options, a YAML file path or a shipped recipe name, got "
                           f"{type(recipe).__name__}")
    path = Path(recipe)
    if path.is_dir():
        raise SlimkitError(f"recipe {path} is a folder: give a YAML file or a shipped recipe name")
    if not path.exists():
        shelf = Path(__file__).parent / "recipes"
        name = str(recipe)
        stem = name.rsplit(".", 1)[0] if name.endswith((".yaml", ".yml")) else name
        shipped = shelf / f"{stem}.yaml"
        if path.parent != Path(".") or not shipped.is_file():
            names = ", ".join(sorted(p.stem for p in shelf.glob("*.yaml")))
            raise SlimkitError(f"recipe {name!r} not found: give a YAML file path or a shipped recipe name ({names})")
        path = shipped
    try:
        values = yaml.load(path.read_text(), Loader=_RecipeLoader)
    except yaml.YAMLError as e:
        raise SlimkitError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise SlimkitError(f"recipe {path} is not a text file (not UTF-8): give a YAML file") from None
    except OSError as e:
        raise SlimkitError(f"recipe {path} cannot be read ({e.strerror or e})") from None
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        raise SlimkitError(f"recipe {path} must be a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in values.items()}
