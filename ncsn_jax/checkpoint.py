"""The converted parameter file: one msgpack file holding a Flax parameter tree and metadata.

Layout of the decoded file (flax.serialization msgpack, which stores arrays as raw bytes and never
runs code when read):

    {'format': 'ncsn-jax', 'version': 1, 'kind': KIND, 'metadata': {...}, 'params': TREE,
     'extra': {...}}

KIND is 'score_model', 'inception' or 'train_state'. `metadata` contains JSON-compatible values
(architecture, ngf, channels, the SHA-256 of the source file, conversion options). `extra` contains
further array trees, such as the sigma table, the EMA parameters or an optimizer state.
"""

from pathlib import Path

import numpy as np
from flax import serialization

from ncsn_jax.errors import UserError
from ncsn_jax.fileio import atomic_write_bytes

FORMAT_NAME = 'ncsn-jax'
FORMAT_VERSION = 1
KINDS = ('score_model', 'inception', 'train_state')

# torch.save writes a zip archive (PyTorch 1.6 and later) or, in the legacy format, a pickle.
_TORCH_FILE_SIGNATURES = (b'PK\x03\x04', b'\x80\x02', b'\x80\x04', b'\x80\x05')

# Hints for a file of one kind given where another kind is expected.
_KIND_HINTS = {
    ('train_state', 'score_model'): "; a training run's weights for sampling are in its "
                                    'score_model.msgpack',
    ('score_model', 'train_state'): '; a training state is a checkpoints/checkpoint.msgpack of a '
                                    'run or a file from convert/torch_to_flax.py --train-state',
}


def _to_numpy(tree):
    if isinstance(tree, dict):
        return {str(k): _to_numpy(v) for k, v in tree.items()}
    if hasattr(tree, 'shape') and hasattr(tree, 'dtype'):
        return np.asarray(tree)
    return tree


def write_params_file(path, *, kind: str, params, metadata: dict, extra: dict | None = None,
                      overwrite: bool = False) -> Path:
    """Serialize `params` (a nested dict of arrays) with its metadata to `path`, atomically."""
    if kind not in KINDS:
        raise ValueError(f'unknown kind {kind!r}; expected one of {KINDS}')
    payload = {
        'format': FORMAT_NAME,
        'version': FORMAT_VERSION,
        'kind': kind,
        'metadata': dict(metadata),
        'params': _to_numpy(params),
        'extra': _to_numpy(extra or {}),
    }
    return atomic_write_bytes(path, serialization.msgpack_serialize(payload), overwrite=overwrite)


def read_params_file(path, *, kind: str | None = None) -> dict:
    """Read a file written by `write_params_file` and return its decoded dict.

    Raises UserError for a missing file, a file in another format, or one of another `kind`.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f'converted parameter file not found: {path}; check the path, or create '
                        'the file with convert/torch_to_flax.py')
    data = path.read_bytes()
    if data.startswith(_TORCH_FILE_SIGNATURES):
        raise UserError(f'{path} is a PyTorch file, not an ncsn-jax parameter file; convert it '
                        'first with convert/torch_to_flax.py')
    try:
        payload = serialization.msgpack_restore(data)
    except Exception:  # msgpack raises several unrelated types for corrupt input
        raise UserError(f'cannot read {path}: not an ncsn-jax parameter file, or one that is '
                        'truncated or damaged; write it again with the tool that made it '
                        '(convert/torch_to_flax.py or the trainer)') from None
    if not isinstance(payload, dict) or payload.get('format') != FORMAT_NAME:
        raise UserError(f'{path} is not an ncsn-jax parameter file; '
                        're-create it with convert/torch_to_flax.py')
    if payload.get('version') != FORMAT_VERSION:
        raise UserError(f'{path} has format version {payload.get("version")}, this ncsn-jax reads '
                        f'version {FORMAT_VERSION}; re-create it with convert/torch_to_flax.py')
    if kind is not None and payload.get('kind') != kind:
        found = payload.get('kind')
        hint = _KIND_HINTS.get((found, kind), '')
        raise UserError(f'{path} is a {found!r} file, expected {kind!r}{hint}')
    payload.setdefault('extra', {})
    return payload
