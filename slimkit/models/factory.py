"""Users' own models by name: 'path/to/file.py:function' or 'package.module:function' returning an nn.Module,
optionally with a safetensors state dict. The spec is recorded so a saved artifact can rebuild the model."""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

from torch import nn

from ..errors import SlimkitError


def is_factory(spec: str) -> bool:
    return ":" in spec and not Path(spec).exists()


def _import(target: str, root: str | None):
    """import_module(target); when that fails and `root` (the folder it was imported from when the artifact was
    made) is given, once more with root on sys.path, so an artifact evaluates from any folder."""
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError:
        if not root or root in sys.path:
            raise
    sys.path.insert(0, root)
    return importlib.import_module(target)


def _root(module, target: str) -> str | None:
    """The sys.path folder `module` (imported as `target`) was found in."""
    file = getattr(module, "__file__", None)
    if not file:
        return None
    path = Path(file).resolve()
    path = path.parent if path.name == "__init__.py" else path
    return str(path.parents[len(target.split(".")) - 1])


def build_from_factory(spec: str, weights: str | Path | None = None, root: str | None = None) -> nn.Module:
    """Call the factory named by `spec` and load `weights` (safetensors) into what it returns. `root`: where a
    'package.module:function' factory was imported from (recorded in artifacts)."""
    target, _, fn_name = spec.rpartition(":")
    if not target or not fn_name:
        raise SlimkitError(f"model factory {spec!r} must look like 'file.py:function' or 'package.module:function'")
    try:
        if target.endswith(".py"):
            path = Path(target).resolve()
            if not path.exists():
                raise SlimkitError(f"model factory file {target} does not exist")
            spec = f"{path}:{fn_name}"     # recorded absolute, so an artifact rebuilds from any folder
            mod_name = f"slimkit_user_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[mod_name] = module
            module_spec.loader.exec_module(module)
        else:
            module = _import(target, root)
            root = _root(module, target)
    except SlimkitError:
        raise
    except SystemExit as e:       # a script's sys.exit() at import: it would end slimkit without a word
        raise SlimkitError(f"cannot import {target}: it calls sys.exit({e.code!r}) when imported; guard its script "
                           "part with `if __name__ == \"__main__\":`") from None
    except Exception as e:
        raise SlimkitError(f"cannot import {target}: {type(e).__name__}: {e}") from None
    fn = getattr(module, fn_name, None)
    if fn is None or not callable(fn):
        raise SlimkitError(f"{target} has no function {fn_name!r}")
    try:
        inspect.signature(fn).bind()
    except TypeError as e:
        raise SlimkitError(f"{spec} cannot be called without arguments ({e}): point at a function that builds "
                           "the model with no arguments (wrap it: def build(): return Net(width=64))") from None
    except ValueError:                      # a builtin without a signature: just call it
        pass
    try:
        model = fn()
    except SystemExit as e:
        raise SlimkitError(f"{spec} called sys.exit({e.code!r}) while building the model: return the model "
                           "instead") from None
    except Exception as e:
        raise SlimkitError(f"{spec} failed while building the model: {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise SlimkitError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        load_weights(model, weights)
    kwargs = {"weights": str(Path(weights).resolve())} if weights else {}
    if not target.endswith(".py") and root:
        kwargs["root"] = root
    model._slimkit_spec = {"builder": spec, "kwargs": kwargs}
    return model.eval()


def load_weights(model: nn.Module, weights: str | Path) -> None:
    """Load a safetensors state dict (strict), with a clear error on a mismatch."""
    from safetensors.torch import load_file

    path = Path(weights)
    if path.suffix != ".safetensors":
        raise SlimkitError(f"weights must be a .safetensors file (pickles are never loaded), got {path.name}")
    if not path.exists():
        raise SlimkitError(f"weights file {path} does not exist")
    try:
        state = load_file(str(path))
        model.load_state_dict(state)
    except Exception as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise SlimkitError(f"cannot load {path} into the model: {' '.join(lines[:4])[:600]}") from None
