"""Saved artifacts: a directory with `model.safetensors` and `manifest.json`. No pickle anywhere.

Each quantized layer's weight is stored as its integer codes, offset to be non-negative and bit-packed
(b bits each), with its scales and zero points; each sparsified float layer's weight as its non-zero values
and a bitmask (`slimkit.sparsify`); everything else of the model's state is stored as is.
The manifest records the method, config, per-layer settings, the BatchNorm pairs folded, the input shape,
how to rebuild the architecture, and metrics. `load` rebuilds a model whose outputs equal the in-memory
quantized model's bit for bit. Writes go to a temporary directory renamed into place, so a failure never
leaves a half-written artifact.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.quantizer import QuantSpec, to_rows
from ..core.sparsity import pack_sparse, stored_bytes, unpack_sparse
from ..core.entry import reattach_entries
from ..core.fold import remainder
from ..core.wrap import LayerPlan, quant_layers, set_submodule, weight_oi, working_copy, wrap_layers
from ..errors import SlimkitError, warn

FORMAT, VERSION = "slimkit", 1
WEIGHTS, MANIFEST = "model.safetensors", "manifest.json"
HF_QUANT = "slimkit.safetensors"  # Hugging Face artifacts: model.safetensors is transformers' own file
HF_CONFIG = "hf_config"           # other artifacts of Hugging Face models: their config.json (+ tokenizer) there


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned integers < 2**bits into a little-endian bit stream of uint8."""
    planes = np.unpackbits(codes.astype(np.uint8).reshape(-1, 1), axis=1, bitorder="little")[:, :bits]
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of pack_bits: `count` unsigned integers of `bits` bits each. The stream must have exactly the
    bytes they take (a manifest whose bit width or shape does not match its codes is refused, not misread)."""
    need = -(-count * bits // 8)
    if packed.ndim != 1 or packed.size != need:
        raise ValueError(f"packed codes hold {packed.size} bytes, but {count} codes of {bits} bits take {need}: "
                         "the manifest's bit width or shape does not match the stored codes")
    planes = np.unpackbits(packed, bitorder="little")[: count * bits].reshape(count, bits)
    planes = np.pad(planes, ((0, 0), (0, 8 - bits)))
    return np.packbits(planes, axis=1, bitorder="little").reshape(count)


def pack_codes(layer) -> tuple[dict[str, torch.Tensor], dict]:
    """A frozen QuantLayer's weight codes for storage, by suffix: "w_packed" (bit-packed codes of every weight,
    or of a sparse layer's kept weights only) and, for a sparse layer, "w_mask" (its keep-bitmask); plus the
    manifest entries to add ({"w_sparse": True} for a sparse layer)."""
    spec = layer.w_quant.spec
    codes = (layer.w_int.cpu().to(torch.int32) - spec.qmin).numpy().astype(np.uint8)
    out, info = {}, {}
    if layer.w_mask is not None:   # sparse and quantized: the kept weights' codes and a bitmask
        keep = layer.w_mask.cpu()
        codes = codes.reshape(-1)[keep.reshape(-1).numpy()]
        out["w_mask"] = pack_sparse(keep, keep)["bitmask"]
        info["w_sparse"] = True
    out["w_packed"] = torch.from_numpy(pack_bits(codes, spec.bits))
    return out, info


def unpack_codes(layer, tensors: dict[str, torch.Tensor], name: str, shape: list[int], sparse: bool) -> None:
    """Inverse of pack_codes: set layer.w_int (and a sparse layer's mask) from `tensors` (popping them)."""
    spec = layer.w_quant.spec
    count = int(np.prod(shape))
    if sparse:    # codes of the kept weights only; the pruned ones are zero
        keep = unpack_sparse(torch.zeros(0), tensors.pop(f"{name}.w_mask"), tuple(shape), check=False)[1]
        kept = unpack_bits(tensors.pop(f"{name}.w_packed").numpy(), spec.bits, int(keep.sum()))
        codes = np.zeros(count, dtype=kept.dtype)
        codes[keep.reshape(-1).numpy()] = kept
        layer.set_mask(keep)
    else:
        codes = unpack_bits(tensors.pop(f"{name}.w_packed").numpy(), spec.bits, count)
    layer.w_int = torch.from_numpy(codes.astype(np.int16) + spec.qmin).reshape(shape)


def _state_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict[str, dict]]:
    """(tensors to store, per-layer quantization settings, sparse float weights' shapes)."""
    tensors, layers = {}, {}
    qlayers = quant_layers(model)
    for key, value in model.state_dict().items():
        tensors[key] = value.detach()
    sparse = {}
    for name in (getattr(model, "slimkit_info", None) or {}).get("sparsity", {}).get("layers", {}):
        key = f"{name}.weight"
        if key in tensors and stored_bytes(tensors[key])[1]:   # a float sparse layer whose zeros pay for a mask
            w = tensors.pop(key)                              # (a quantized one keeps its packed codes below)
            packed = pack_sparse(w, w != 0)
            tensors[f"{key}.values"], tensors[f"{key}.bitmask"] = packed["values"], packed["bitmask"]
            sparse[name] = {"shape": list(w.shape)}
    for key, value in tensors.items():
        tensors[key] = value.cpu().contiguous()
    for name, layer in qlayers.items():
        info = layer.settings()
        if layer.w_quant is not None:
            if not layer.frozen:
                raise SlimkitError(f"layer {name} is not frozen: quantize with slimkit.quantize before saving")
            for key in ("w_int", "layer.weight", "w_mask"):
                tensors.pop(f"{name}.{key}", None)
            packed, extra = pack_codes(layer)
            tensors.update({f"{name}.{k}": v for k, v in packed.items()})
            info.update(extra)
            info["w_shape"] = list(layer.w_int.shape)
            info["w_dtype"] = str(layer.layer.weight.dtype).removeprefix("torch.")
        layers[name] = info
    return tensors, layers, sparse


def current_sparsity(model: nn.Module, sparsity: dict) -> dict:
    """`sparsity` (slimkit_info["sparsity"]) with each counted layer's zeros as its weight holds them now (a quantized
    layer's: as its mask does). Fine-tuning after slimkit.sparsify fills pruned weights in, and an artifact must not
    claim the sparsity the model had: the changed layers are named in a warning that says how to keep them sparse."""
    qlayers = quant_layers(model)
    layers, changed = {}, []
    for name, r in sparsity["layers"].items():
        layers[name] = r
        try:
            module = qlayers[name] if name in qlayers else model.get_submodule(name)
        except AttributeError:
            continue
        if name in qlayers:
            zeros = None if module.w_mask is None else int((~module.w_mask).sum())
        else:
            w = getattr(module, "weight", None)
            zeros = int((w == 0).sum()) if isinstance(w, torch.Tensor) else None
        if zeros is None or not isinstance(r, dict) or not r.get("numel") or zeros == r.get("pruned"):
            continue
        layers[name] = {**r, "pruned": zeros, "rate": zeros / r["numel"]}
        changed.append(f"{name} ({100 * r.get('rate', 0):.1f}% -> {100 * zeros / r['numel']:.1f}%)")
    if not changed:
        return sparsity
    warn(f"{', '.join(changed[:6])}{', ...' if len(changed) > 6 else ''}: the share of zeros in "
         f"{'this layer' if len(changed) == 1 else 'these layers'} changed after slimkit.sparsify counted it "
         "(fine-tuning fills pruned weights in); the artifact records the sparsity the model has now and stores a "
         "weight with too few zeros for a bitmask to pay as it is. To keep a model sparse, zero its pruned weights "
         "again after each optimizer step while fine-tuning, or prune the fine-tuned model again with "
         "slimkit.sparsify (before quantizing it)")
    counted = [r for r in layers.values() if isinstance(r, dict) and isinstance(r.get("pruned"), int)]
    total = sum(r["numel"] for r in counted)
    return {**sparsity, "layers": layers,
            "achieved": sum(r["pruned"] for r in counted) / total if total else sparsity.get("achieved")}


def _untie(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Keep one copy of tensors that share memory (tied weights: an output head reusing the embedding, a layer
    used twice): safetensors stores no aliases. Returns {dropped key: the key holding the same tensor}; a tensor
    that only overlaps another (a different view of one storage) is stored as a copy of its own."""
    tied, seen, storages = {}, {}, {}
    for key in list(tensors):
        t = tensors[key]
        if t.numel() == 0 or t.device.type == "meta":
            continue
        sig = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if sig in seen:
            tied[key] = seen[sig]
            del tensors[key]
            continue
        seen[sig] = key
        base = t.untyped_storage().data_ptr()
        if base in storages:
            tensors[key] = t.clone()
        else:
            storages[base] = key
    return tied


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None          # strict JSON has no NaN / Infinity (jq and JavaScript refuse them): null, as unknown
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


ADDED_LATER = {"sparsity.png"}     # what slimkit writes into an artifact folder after saving it (slimkit sparsify)


def check_output(path: str | Path, overwrite: bool = False) -> Path:
    """Fail early, before any work, when an artifact cannot be written at `path`: it exists (without
    `overwrite`); it exists and is not an earlier slimkit artifact or an empty folder (`overwrite` replaces
    only those: it would delete whatever else is there); it is the current folder or holds it; or its nearest
    existing parent is a file or not writable."""
    path = Path(path)
    try:
        full = path.resolve()
        cwd = Path.cwd().resolve()
    except (OSError, RuntimeError) as e:      # a symlink loop
        raise SlimkitError(f"cannot write {path}: {e}") from None
    if full == cwd or full in cwd.parents:
        raise SlimkitError(f"{path} is the current folder or holds it: give a new folder for the artifact")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise SlimkitError(f"{path} already exists: choose another path or pass overwrite=True (--overwrite)")
        if not path.is_dir() or path.is_symlink():
            raise SlimkitError(f"{path} exists and is not a folder: --overwrite replaces earlier artifacts only; "
                               "choose another path")
        if any(path.iterdir()):
            try:
                listed = read_manifest(path).get("files")
            except SlimkitError:
                raise SlimkitError(f"{path} exists and is not a slimkit artifact: --overwrite replaces earlier "
                                   "artifacts (or empty folders) only, as it deletes what the folder holds; "
                                   "choose another path") from None
            others = sorted(f.name for f in path.iterdir() if f.name not in set(listed) | ADDED_LATER) \
                if isinstance(listed, list) else []      # (an artifact saved before manifests listed their files)
            if others:
                raise SlimkitError(f"{path} holds files the artifact there did not write ({', '.join(others[:4])}"
                                   f"{', ...' if len(others) > 4 else ''}): --overwrite would delete them with it; "
                                   "move them out or choose another path")
    parent = path.absolute().parent          # as written: the folders mkdir will have to create or pass
    while not parent.exists():
        if parent.is_symlink():
            raise SlimkitError(f"cannot write {path}: {parent} is a broken symbolic link")
        parent = parent.parent
    if not parent.is_dir():
        raise SlimkitError(f"cannot write {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SlimkitError(f"cannot write {path}: {parent} is not writable")
    return path


def save(model: nn.Module, path: str | Path, overwrite: bool = False, metrics: dict | None = None) -> Path:
    """Write a quantized model to directory `path` (safetensors + JSON manifest), atomically."""
    path = Path(path)
    if metrics is not None and not isinstance(metrics, dict):
        raise SlimkitError(f"metrics must be a dict of names to numbers, got {type(metrics).__name__}")
    if isinstance(getattr(model, "_orig_mod", None), nn.Module) and type(model).__name__ == "OptimizedModule":
        model = model._orig_mod     # torch.compile's wrapper: its state's keys carry "_orig_mod.", which load refuses
    info = getattr(model, "slimkit_info", None)
    if info is None or not (quant_layers(model) or "sparsity" in info):
        raise SlimkitError("this model was not produced by slimkit.quantize or slimkit.sparsify: nothing to save")
    check_output(path, overwrite)
    if isinstance(info.get("sparsity"), dict) and isinstance(info["sparsity"].get("layers"), dict):
        info = {**info, "sparsity": current_sparsity(model, info["sparsity"])}   # (the model's own record untouched)
    if "family" in info:  # a Hugging Face transformer: a model directory transformers can reload, plus ours
        from .hf_artifact import buffer_dtypes, hf_tensors, write_hf

        tensors, layers = hf_tensors(model)
        manifest = {"format": FORMAT, "version": VERSION, **_jsonable(info), "layers": layers, "weights": HF_QUANT,
                    "layers_digest": layers_digest(layers)}
        dtypes = buffer_dtypes(model)
        if dtypes:
            manifest["buffer_dtypes"] = dtypes
        extra = lambda tmp: write_hf(model, tmp)  # noqa: E731  (transformers' files first)
    else:
        tensors, layers, sparse = _state_tensors(model)
        manifest = {"format": FORMAT, "version": VERSION, **_jsonable(info), "layers": layers,
                    "layers_digest": layers_digest(layers)}
        if sparse:
            manifest["sparse_weights"] = sparse
        tied = _untie(tensors)
        if tied:
            manifest["tied_tensors"] = tied
        from .hf_artifact import buffer_dtypes

        dtypes = buffer_dtypes(model)       # (rotary frequencies of a half-precision model, which no file holds)
        if dtypes:
            manifest["buffer_dtypes"] = dtypes
        extra = None
        if hasattr(getattr(model, "config", None), "save_pretrained"):
            # a Hugging Face model (sparse, or an image model; loaded by slimkit or built by the user): its config
            # and tokenizer travel with the artifact, so it rebuilds where its source folder is gone
            manifest["hf_config"] = HF_CONFIG
            manifest["hf_class"] = type(model).__name__
            extra = lambda tmp: _write_hf_config(model, tmp / HF_CONFIG)  # noqa: E731
    if metrics:
        manifest["metrics"] = _jsonable({**info.get("metrics", {}), **metrics})

    def write(tmp: Path) -> None:
        if extra is not None:
            extra(tmp)
        save_file(tensors, str(tmp / manifest.get("weights", WEIGHTS)), metadata={"format": FORMAT})
        manifest["files"] = sorted([f.name for f in tmp.iterdir()] + [MANIFEST])   # what --overwrite may replace
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=False))

    try:
        _write_atomic(path, write)
    except OSError as e:
        raise SlimkitError(f"could not write the artifact {path}: {e.strerror or e}") from None
    return path


def _write_hf_config(model: nn.Module, folder: Path) -> None:
    folder.mkdir()
    model.config.save_pretrained(folder)
    tokenizer = getattr(model, "_slimkit_tokenizer", None)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)


def _remove_stale(path: Path) -> None:
    """Remove what a save to `path` killed mid-way (SIGKILL, power loss) left beside it: temporary folders named
    after a process that no longer runs. Never a valid artifact (the manifest is written last), only clutter."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.tmp-*-*"):
        pid = tmp.name[len(f".{path.name}.tmp-"):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or not tmp.is_dir():
            continue
        try:
            os.kill(int(pid), 0)
            continue                       # that process still runs (perhaps saving right now)
        except ProcessLookupError:
            pass
        except OSError:                    # another user's process: leave its folder alone
            continue
        shutil.rmtree(tmp, ignore_errors=True)


def _write_atomic(path: Path, write) -> None:
    """Run `write(tmp_dir)`, then rename tmp_dir to `path` (replacing an old one): never a half-written artifact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)        # mkdtemp makes 0700: give the artifact the usual permissions
        for f in tmp.rglob("*"):
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:        # (Ctrl-C, a full disk): the old artifact goes back, not left hidden
                os.replace(old, path)
                raise
            try:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
            except OSError as e:     # the new artifact is in place; only the old copy could not be removed
                warnings.warn(f"saved {path}, but the artifact it replaced could not be removed ({e.strerror or e}): "
                              f"delete {old} yourself", stacklevel=3)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_manifest(path: str | Path) -> dict:
    """The manifest of a slimkit artifact, or a clear error for anything else."""
    path = Path(path)
    if not path.exists():
        raise SlimkitError(f"{path} does not exist: give the folder written by slimkit.save / slimkit quantize --out")
    if not path.is_dir():
        raise SlimkitError(f"{path} is not a directory: give the folder written by slimkit.save / slimkit quantize --out")
    mf = path / MANIFEST
    if not mf.exists():
        if (path / "structured.json").exists():
            raise SlimkitError(f"{path} holds a model with structured FFNs (structured.json): load it with "
                               "slimkit.structured.load_structured")
        raise SlimkitError(f"{path} is not a slimkit artifact: it needs {MANIFEST} and {WEIGHTS}")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SlimkitError(f"{mf} is corrupt (not valid JSON: {e})") from None
    except OSError as e:
        raise SlimkitError(f"{mf} cannot be read ({e.strerror or e}): check its permissions") from None
    weights = manifest.get("weights", WEIGHTS) if isinstance(manifest, dict) else WEIGHTS
    if not (path / weights).exists():
        raise SlimkitError(f"{path} is not a complete slimkit artifact: {weights} is missing")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SlimkitError(f"{path} is not a slimkit artifact (its manifest has no format: {FORMAT!r})")
    version = manifest.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > VERSION:
        raise SlimkitError(f"{path} has artifact version {version}, this slimkit reads version {VERSION}: upgrade slimkit")
    if version != VERSION:
        raise SlimkitError(f"{mf} is damaged: its version is {version!r}, where slimkit writes and reads {VERSION}")
    for key, kind in (("layers", dict), ("model_spec", dict), ("folded_bn", list), ("tied_tensors", dict),
                      ("sparse_weights", dict), ("buffer_dtypes", dict)):
        if manifest.get(key) is not None and not isinstance(manifest[key], kind):
            raise SlimkitError(f"{mf} is damaged: its {key!r} is a {type(manifest[key]).__name__}, not a "
                               f"{kind.__name__}")
    if not isinstance((manifest.get("model_spec") or {}).get("kwargs", {}), dict):
        raise SlimkitError(f"{mf} is damaged: its model_spec's 'kwargs' is not a mapping")
    pairs = [tuple(p) if isinstance(p, list) else p for p in manifest.get("folded_bn", [])]
    if len(set(map(str, pairs))) != len(pairs):
        raise SlimkitError(f"{mf} is damaged: 'folded_bn' lists a pair twice")
    if "layers_digest" in manifest and manifest["layers_digest"] != layers_digest(manifest.get("layers")):
        raise SlimkitError(f"{mf} was edited after saving: its layers' quantization settings (bit widths, symmetry, "
                           "axes) no longer match the codes stored with them; quantize and save the model again")
    return manifest


def layers_digest(layers) -> str:
    """A short hash of the manifest's per-layer quantization settings, kept beside them: the stored codes and
    steps mean something only under the settings they were made with, and a hand edit of those (a bit width,
    symmetry, a channel axis) cannot always be told from the tensors alone."""
    return hashlib.sha256(json.dumps(layers, sort_keys=True).encode()).hexdigest()[:16]


def why(e: BaseException) -> str:
    """The first two lines of an error (torch's load_state_dict puts the key it names on the second)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return " ".join(lines[:2])[:400] or type(e).__name__


def read_weights(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, or a clear error saying whether it is unreadable or corrupt."""
    try:
        return load_file(str(file))
    except PermissionError as e:
        raise SlimkitError(f"{file} cannot be read ({e.strerror}): check its permissions") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise SlimkitError(f"{file} is corrupt: {e}") from None


def check_scales(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Every stored quantization step must be a finite positive number: a NaN or zero one would load into a model
    that outputs NaN or constant values."""
    bad = [k for k, t in tensors.items() if k.endswith(".scale") and t.is_floating_point()
           and not bool((torch.isfinite(t) & (t > 0)).all())]
    if bad:
        raise SlimkitError(f"the artifact at {path} is corrupt: quantization steps that are not finite positive "
                           f"numbers in {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}")


def check_qparams(q, what: str, w_shape: list[int] | None = None) -> None:
    """A reloaded quantizer's parameters fit its spec, or ValueError naming `what`: whole zero points on the
    spec's grid (zero for a symmetric one), one per scale, and as many scales as the granularity has groups (a
    weight's from its shape; a per-tensor activation's: one). A hand-edited or damaged artifact (a zero point far
    off the grid, a bit width or symmetry changed in the manifest, a per-channel scale cut to one number) would
    otherwise load into a different model."""
    spec, scale, zp = q.spec, q.scale, q.zero_point
    if zp.numel() != scale.numel():
        raise ValueError(f"{what}: {zp.numel()} zero points for {scale.numel()} scales")
    if not (bool(torch.isfinite(zp).all()) and torch.equal(zp, zp.round())
            and spec.qmin <= float(zp.min()) and float(zp.max()) <= spec.qmax):
        raise ValueError(f"{what}: zero points that are not whole numbers on the {spec.bits}-bit "
                         f"{'symmetric' if spec.symmetric else 'asymmetric'} grid [{spec.qmin}, {spec.qmax}]")
    if spec.symmetric and bool((zp != 0).any()):
        raise ValueError(f"{what}: a symmetric quantizer with nonzero zero points")
    if w_shape is not None:
        groups = to_rows(torch.empty(w_shape, device="meta"), spec).shape[0]
    else:
        groups = 1 if spec.granularity == "tensor" else None
    if groups is not None and scale.numel() != groups:
        raise ValueError(f"{what}: {scale.numel()} scales where its {spec.granularity} granularity has {groups} "
                         "groups")


def _spec(d: dict | None) -> QuantSpec | None:
    return None if d is None else QuantSpec(**d)


def _rebuild(path: Path, manifest: dict) -> nn.Module:
    """The float architecture an artifact names: a Hugging Face model from the config saved with it (or its
    source), a shipped / registered model from its builder."""
    spec = manifest.get("model_spec") or {}
    saved_config = path / manifest["hf_config"] if manifest.get("hf_config") else None
    if saved_config is not None and saved_config.is_dir():
        # the config saved with the artifact first: the source folder may since hold another model, and a model the
        # user built has no other record
        from ..models.hf import hf_from_config

        try:
            return hf_from_config(saved_config, spec.get("hf"), manifest.get("hf_class"))
        except (OSError, ValueError, AttributeError, TypeError, KeyError) as e:
            raise SlimkitError(f"cannot rebuild the Hugging Face model of {path} from its saved config ({why(e)}); "
                               "pass the float architecture: slimkit.load(path, model=...)") from None
    if not spec:
        raise SlimkitError(f"{path} holds a model slimkit cannot rebuild by name: pass the float architecture, "
                           "slimkit.load(path, model=YourModel())")
    if "hf" in spec:    # a Hugging Face model (sparse, or an image model) whose artifact kept no config
        from ..models.hf import load_hf, source_available

        if source_available(spec["hf"]):
            return load_hf(spec["hf"])[0]
        raise SlimkitError(f"{path} was made from the Hugging Face model in {spec['hf']}, which is gone: put "
                           "it back, or pass the float architecture, slimkit.load(path, model=...)")
    from ..models.registry import get_model

    # the architecture only: every weight comes from the artifact, so the float weights the model was built with
    # (recorded as a path) need not exist any more
    kwargs = {k: v for k, v in spec.get("kwargs", {}).items() if k != "weights"}
    try:
        return get_model(spec["builder"], **kwargs)
    except SlimkitError as e:
        raise SlimkitError(f"cannot rebuild the architecture of {path} from {spec['builder']} ({e}); pass "
                           "it yourself: slimkit.load(path, model=YourModel())") from None


def _take_dtypes(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Give each floating parameter / buffer the dtype its saved tensor has (a half-precision model rebuilt from
    its config comes in float32, and load_state_dict would cast the saved values up), in place: tied parameters
    stay one object."""
    held = dict(model.named_parameters(remove_duplicate=False))
    held.update(model.named_buffers(remove_duplicate=False))
    for key, t in tensors.items():
        p = held.get(key)
        if p is not None and p.is_floating_point() and t.is_floating_point() and p.dtype != t.dtype:
            p.data = p.data.to(t.dtype)


def load(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a saved quantized model. `model`: a float instance of the architecture, needed only when the
    artifact came from a model slimkit cannot build by name (your own nn.Module class)."""
    path = Path(path)
    if model is not None and not isinstance(model, nn.Module):
        raise SlimkitError(f"model= takes a float instance of the architecture (an nn.Module), got "
                           f"{type(model).__name__}: the artifact rebuilds a shipped or registered model by itself")
    manifest = read_manifest(path)
    if "family" in manifest:
        from .hf_artifact import load_hf_artifact

        return load_hf_artifact(path, manifest, model)
    tensors = read_weights(path / WEIGHTS)
    check_scales(tensors, path)
    if model is None:
        model = _rebuild(path, manifest)
    # a copy whose parametrized weights (weight_norm, spectral_norm ...) are plain ones, as slimkit.quantize and
    # slimkit.sparsify compressed them: the artifact stores those plain weights
    model = working_copy(model).eval().cpu()
    try:
        for conv_name, bn_name in manifest.get("folded_bn", []):
            conv = model.get_submodule(conv_name)
            if conv.bias is None:
                conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype))
            set_submodule(model, bn_name, remainder(model.get_submodule(bn_name)))
        plans = {name: LayerPlan(_spec(s["weight"]), _spec(s["act"]), s.get("w_observer") or "minmax",
                                 s.get("a_observer") or "minmax") for name, s in manifest["layers"].items()}
        wrapped = wrap_layers(model, plans, init_qparams=False)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise SlimkitError(f"the artifact at {path} does not match this model architecture: {e}") from None
    handled = set()
    try:
        for key, source in manifest.get("tied_tensors", {}).items():
            tensors[key] = tensors[source]
        for name, entry in manifest.get("sparse_weights", {}).items():
            key = f"{name}.weight"
            tensors[key] = unpack_sparse(tensors.pop(f"{key}.values"), tensors.pop(f"{key}.bitmask"),
                                         tuple(entry["shape"]))[0]
        for name, layer in wrapped.items():
            s = manifest["layers"][name]
            for qname in ("w_quant", "a_quant"):
                q = getattr(layer, qname)
                if q is not None:
                    handled.update({f"{name}.{qname}.scale", f"{name}.{qname}.zero_point"})
                    q.set_qparams(tensors.pop(f"{name}.{qname}.scale"), tensors.pop(f"{name}.{qname}.zero_point"))
                    check_qparams(q, f"{name}.{qname}", s["w_shape"] if qname == "w_quant" else None)
            if layer.w_quant is not None:
                unpack_codes(layer, tensors, name, s["w_shape"], bool(s.get("w_sparse")))
                handled.update({f"{name}.w_int", f"{name}.layer.weight", f"{name}.w_mask"})
                w_dtype = getattr(torch, s.get("w_dtype") or "", None)    # the saved dtype, whatever the twin's
                if isinstance(w_dtype, torch.dtype) and layer.layer.weight.dtype != w_dtype:
                    layer.layer.weight.data = layer.layer.weight.data.to(w_dtype)
                with torch.no_grad():
                    weight_oi(layer.layer).copy_(layer.quantized_weight())
        _take_dtypes(model, tensors)
        from .hf_artifact import restore_buffer_dtypes

        restore_buffer_dtypes(model, manifest.get("buffer_dtypes") or {})
        state = OrderedDict(tensors)
        state._metadata = getattr(model.state_dict(), "_metadata", None)   # modules that check a state version
        missing, unexpected = model.load_state_dict(state, strict=False)
        reattach_entries(model, manifest["layers"])
    except (KeyError, RuntimeError, ValueError, IndexError, TypeError, AttributeError, StopIteration) as e:
        raise SlimkitError(f"the artifact at {path} is corrupt or does not match the model: {why(e)}") from None
    missing = [k for k in missing if k not in handled]
    if missing or unexpected:
        raise SlimkitError(f"the artifact at {path} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.slimkit_info = {k: v for k, v in manifest.items() if k not in ("format", "version")}
    if manifest.get("model_spec"):
        model._slimkit_spec = manifest["model_spec"]
    return model
