"""Atomic file writes: data goes to a temporary name in the target folder, then is renamed."""

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path, data: bytes, *, overwrite: bool = False) -> Path:
    """Write `data` to `path` so that readers see either the old file or the complete new one.

    Raises FileExistsError when `path` exists and `overwrite` is false. The rename is atomic on
    POSIX file systems because the temporary file lies in the same folder.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file with mode 0600; give it the mode a plain open() would.
        os.chmod(tmp_name, 0o666 & ~_current_umask())
        if overwrite:
            os.replace(tmp_name, path)
        else:
            # os.link fails if `path` appeared meanwhile, so a concurrent writer is never clobbered.
            os.link(tmp_name, path)
            os.unlink(tmp_name)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return path


def atomic_write_text(path, text: str, *, overwrite: bool = False) -> Path:
    return atomic_write_bytes(path, text.encode('utf-8'), overwrite=overwrite)


def atomic_write_json(path, obj, *, overwrite: bool = False) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=1) + '\n', overwrite=overwrite)


def atomic_save_npz(path, *, overwrite: bool = False, **arrays) -> Path:
    """Save arrays uncompressed with np.savez, atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.asarray(value) for name, value in arrays.items()})
    return atomic_write_bytes(path, buffer.getvalue(), overwrite=overwrite)
