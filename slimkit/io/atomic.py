"""Writing a file so that it is there whole or not at all."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import SlimkitError


def nearest_existing(path) -> Path:
    """The nearest part of `path` that exists (path itself, else its closest parent): where a folder about to be
    made would go, and what decides whether it can be."""
    return next(p for p in [Path(path), *Path(path).parents] if p.exists())


def unwritable_part(path) -> Path | None:
    """The nearest existing part of `path` where it cannot take new files (read-only, or not this user's), else
    None: a folder to be written later is refused at once, not part-way through the work."""
    near = nearest_existing(path)
    return None if os.access(near, os.W_OK | os.X_OK) else near


def atomic_write(path: Path, write) -> None:
    """Write through write(tmp_path) to a temporary name in the same folder, then rename onto path. Whatever stops
    the write part-way (Ctrl-C, a full disk) leaves the file there before, if any, untouched and no temporary file;
    an OSError becomes a SlimkitError naming the file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:     # a full disk, a folder turned read-only: the file there before (if any) is untouched
        raise SlimkitError(f"could not write {path}: {e.strerror or e}") from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:     # a read-only folder tells EROFS even for no file: the error above is the one to show
            pass
