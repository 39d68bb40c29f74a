"""Chunk files of a sampling run, and the streaming writer that assembles outputs from them.

Every finished chunk is saved as `EXP/chunks/chunk_<c>.npz` (c zero-padded to 5 digits), written
to a temporary name and renamed, so a file with the final name is complete unless it was damaged
afterwards. Members, for the `count` samples of chunk c:

    meta                JSON text: format version, chunk index, first sample index, count and the
                        run settings that determine the contents (see `experiment.chunk_meta`)
    indices             (count,) int64 sample indices
    samples             (count, H, W, C) float32 final samples
    snapshots           (S, count, H, W, C) float32 samples after each global step listed in
                        meta['snapshot_steps']
    grid_snapshots      (G, g, H, W, C) float32 samples after each step of meta['grid_steps'],
                        only of the g samples of the chunk whose index is below meta['grid_count']
    norm_sums           (10, L·T) float64 per-step sums of the per-sample norms, rows in
                        `sampling.NORM_NAMES` order
    pool_<k>, logits_<k>  (count, 2048) and (count, 1008) float32 Inception features of the
                        samples after global step k (evaluation on; k = L·T for the final samples)
    sha256              hex SHA-256 over every other member (name, dtype, shape and bytes, in
                        name order)

`load_chunk` rejects a file whose checksum, zip structure or meta does not match.
"""

import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from ncsn_jax.fileio import atomic_save_npz

CHUNK_FORMAT_VERSION = 1
CHUNK_DIR_NAME = 'chunks'
CHECKSUM_MEMBER = 'sha256'


class InvalidChunk(Exception):
    """A chunk file that is truncated, corrupt or written with other run settings."""


def chunk_path(chunk_dir, chunk: int) -> Path:
    return Path(chunk_dir) / f'chunk_{chunk:05d}.npz'


def _checksum(arrays: dict) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f'{name}\0{array.dtype.str}\0{array.shape}\0'.encode('utf-8'))
        digest.update(array.tobytes())
    return digest.hexdigest()


def save_chunk(path, meta: dict, arrays: dict) -> Path:
    """Save one chunk atomically, replacing an existing (invalid) file of the same name."""
    members = dict(arrays, meta=np.asarray(json.dumps(meta, sort_keys=True)))
    members[CHECKSUM_MEMBER] = np.asarray(_checksum(members))
    return atomic_save_npz(path, overwrite=True, **members)


def load_chunk(path, expected_meta: dict) -> dict:
    """Read and verify a chunk file, and return its arrays (without meta and checksum).

    Raises InvalidChunk when the file cannot be read, its checksum does not match its contents,
    or its meta differs from `expected_meta`.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            members = {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise InvalidChunk(f'unreadable ({type(exc).__name__}: {exc})') from None
    stored = members.pop(CHECKSUM_MEMBER, None)
    if stored is None:
        raise InvalidChunk(f'no {CHECKSUM_MEMBER} member')
    if str(stored) != _checksum(members):
        raise InvalidChunk('SHA-256 checksum does not match the contents')
    try:
        meta = json.loads(str(members.pop('meta')))
    except (KeyError, ValueError) as exc:
        raise InvalidChunk(f'missing or invalid meta ({exc})') from None
    expected = json.loads(json.dumps(expected_meta, sort_keys=True))
    if meta != expected:
        changed = sorted(key for key in set(meta) | set(expected)
                         if meta.get(key) != expected.get(key))
        raise InvalidChunk(f'written with other run settings ({", ".join(changed)} differ)')
    return members


class NpzArrayWriter:
    """Write one array into an uncompressed .npz file block by block along axis 0.

    The data goes to a temporary file in the target folder, which `close` renames to `path`
    (replacing an existing file), so readers never see a partial file. Only one block is in
    memory at a time. `np.load(path)[name]` reads the result like an np.savez file.
    """

    def __init__(self, path, name: str, shape, dtype=np.float32):
        self.path = Path(path)
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.rows_written = 0
        fd, self._tmp_name = tempfile.mkstemp(dir=self.path.parent, prefix=f'.{self.path.name}.',
                                              suffix='.tmp')
        self._file = os.fdopen(fd, 'w+b')
        self._zip = zipfile.ZipFile(self._file, 'w', compression=zipfile.ZIP_STORED,
                                    allowZip64=True)
        self._member = self._zip.open(f'{name}.npy', 'w', force_zip64=True)
        header = {'descr': np.lib.format.dtype_to_descr(self.dtype), 'fortran_order': False,
                  'shape': self.shape}
        np.lib.format.write_array_header_1_0(self._member, header)

    def write(self, block):
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.shape[1:] != self.shape[1:]:
            raise ValueError(f'{self.path.name}: block of shape {block.shape} does not fit an '
                             f'array of shape {self.shape}')
        if self.rows_written + block.shape[0] > self.shape[0]:
            raise ValueError(f'{self.path.name}: more than {self.shape[0]} rows written')
        self._member.write(block.tobytes())
        self.rows_written += block.shape[0]

    def close(self) -> Path:
        """Finish the file and rename it to `path`. Raises ValueError if rows are missing."""
        if self.rows_written != self.shape[0]:
            self.abort()
            raise ValueError(f'{self.path.name}: {self.rows_written} of {self.shape[0]} rows '
                             'written')
        self._member.close()
        self._zip.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp_name, self.path)
        return self.path

    def abort(self):
        """Discard the temporary file."""
        for handle in (self._member, self._zip, self._file):
            try:
                handle.close()
            except (OSError, ValueError):
                pass
        if os.path.exists(self._tmp_name):
            os.unlink(self._tmp_name)
