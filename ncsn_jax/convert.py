"""PyTorch checkpoints -> ncsn-jax parameter files.

The only module of the package that imports torch, and only inside the functions that read a
PyTorch file. The mapping itself works on NumPy arrays: a PyTorch key such as
`module.res2.0.conv2.conv.weight` becomes the Flax path ('res2_0', 'conv2', 'conv', 'kernel'),
with convolution kernels transposed from OIHW to HWIO.
"""

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np

from ncsn_jax import checkpoint
from ncsn_jax.errors import UserError
from ncsn_jax.models import ARCHITECTURES, create_model

log = logging.getLogger(__name__)

CONVERTER_VERSION = 1


@dataclass
class TorchCheckpoint:
    """The parts of an official NCSNv2 checkpoint, as NumPy arrays without the `module.` prefix."""

    model_state: dict
    ema_shadow: dict | None = None
    optimizer_state: dict | None = None
    epoch: int | None = None
    step: int | None = None
    extra: dict = field(default_factory=dict)


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def import_torch(purpose: str):
    """Import torch, or raise UserError saying that `purpose` needs it and how to install it."""
    try:
        import torch
    except ImportError:
        raise UserError(f'{purpose} needs torch; install it with pip install \'ncsn-jax[convert]\' '
                        '(or pip install torch==2.13.0)') from None
    return torch


def load_torch_file(path):
    """Read a PyTorch file with `torch.load(weights_only=True)`, which never runs pickled code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f'checkpoint not found: {path}; check the path')
    torch = import_torch('reading PyTorch checkpoints')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError or EOFError for bad files
        message = str(exc)
        # torch names the blocked callable as 'unsupported GLOBAL <name>' (2.6 and later).
        if 'Weights only load failed' in message and 'unsupported global' in message.lower():
            raise UserError(f'refusing to load {path}: it contains pickled Python objects that could '
                            'run code; only files of tensors and plain containers are accepted. '
                            'Re-save the state dict from a trusted environment') from None
        raise UserError(f'cannot read {path}: not a PyTorch checkpoint, or one that is truncated '
                        'or damaged; download or save it again') from None


def _to_numpy(value):
    if hasattr(value, 'detach'):
        return value.detach().cpu().numpy()
    if isinstance(value, dict):
        return {k: _to_numpy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_numpy(v) for v in value)
    return value


def _is_tensor_dict(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(
        isinstance(k, str) and hasattr(v, 'shape') for k, v in value.items())


def strip_module_prefix(state: dict) -> dict:
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}


def split_checkpoint(obj, path) -> TorchCheckpoint:
    """Accept the official list layout `[model, optimizer, epoch, step, ema_shadow]` or a state dict."""
    if isinstance(obj, (list, tuple)):
        if not obj or not _is_tensor_dict(obj[0]):
            raise UserError(f'{path}: a list checkpoint must start with the model state dict '
                            '([model_state, optimizer_state, epoch, step, ema_shadow])')
        ema = obj[4] if len(obj) > 4 and _is_tensor_dict(obj[4]) else None
        return TorchCheckpoint(
            model_state=strip_module_prefix(_to_numpy(obj[0])),
            ema_shadow=strip_module_prefix(_to_numpy(ema)) if ema is not None else None,
            optimizer_state=_to_numpy(obj[1]) if len(obj) > 1 and isinstance(obj[1], dict) else None,
            epoch=int(obj[2]) if len(obj) > 2 and isinstance(obj[2], int) else None,
            step=int(obj[3]) if len(obj) > 3 and isinstance(obj[3], int) else None)
    if _is_tensor_dict(obj):
        return TorchCheckpoint(model_state=strip_module_prefix(_to_numpy(obj)))
    if isinstance(obj, dict) and _is_tensor_dict(obj.get('state_dict')):
        return TorchCheckpoint(model_state=strip_module_prefix(_to_numpy(obj['state_dict'])))
    raise UserError(f'{path}: unrecognised checkpoint layout ({type(obj).__name__}); expected the '
                    'official list [model_state, optimizer_state, epoch, step, ema_shadow] or a '
                    'state dict of tensors')


# ---------------------------------------------------------------------------------------------
# Key mapping between PyTorch state dicts and Flax parameter trees.

def flax_path(torch_key: str) -> tuple:
    """Map `res2.0.conv2.conv.weight` to ('res2_0', 'conv2', 'conv', 'kernel')."""
    parts = []
    for part in torch_key.split('.'):
        if part.isdigit() and parts:
            parts[-1] = f'{parts[-1]}_{part}'
        else:
            parts.append(part)
    if parts[-1] == 'weight':
        parts[-1] = 'kernel'
    return tuple(parts)


_LIST_ITEM = re.compile(r'^(.+)_(\d+)$')


def torch_key(path: tuple) -> str:
    """Inverse of `flax_path`."""
    parts = []
    for part in path[:-1]:
        match = _LIST_ITEM.match(part)
        parts.extend(match.groups() if match else (part,))
    parts.append('weight' if path[-1] == 'kernel' else path[-1])
    return '.'.join(parts)


def _torch_to_flax_array(key_path: tuple, value: np.ndarray) -> np.ndarray:
    if key_path[-1] == 'kernel' and value.ndim == 4:
        return np.ascontiguousarray(np.transpose(value, (2, 3, 1, 0)))
    if key_path[-1] == 'kernel' and value.ndim == 2:
        return np.ascontiguousarray(value.T)
    return np.asarray(value)


def _flax_to_torch_array(key_path: tuple, value: np.ndarray) -> np.ndarray:
    value = np.asarray(value)
    if key_path[-1] == 'kernel' and value.ndim == 4:
        return np.ascontiguousarray(np.transpose(value, (3, 2, 0, 1)))
    if key_path[-1] == 'kernel' and value.ndim == 2:
        return np.ascontiguousarray(value.T)
    return value


def params_from_state_dict(state: dict) -> dict:
    """Nest a PyTorch state dict (NumPy values) into a Flax parameter tree."""
    tree = {}
    for key, value in state.items():
        path = flax_path(key)
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _torch_to_flax_array(path, value)
    return tree


def state_dict_from_params(params: dict) -> dict:
    """Flatten a Flax parameter tree back into PyTorch keys and layouts (NumPy values)."""
    flat = {}

    def visit(node, prefix):
        for name, value in node.items():
            if isinstance(value, dict):
                visit(value, prefix + (name,))
            else:
                flat[torch_key(prefix + (name,))] = _flax_to_torch_array(prefix + (name,), value)

    visit(params, ())
    return flat


# ---------------------------------------------------------------------------------------------
# Score models.

def infer_architecture(state: dict, path) -> tuple[str, int, int]:
    """Return (architecture, ngf, channels) from the keys and shapes of a score-model state dict."""
    if 'begin_conv.weight' not in state or 'res1.0.conv1.weight' not in state:
        raise UserError(f'{path}: not an NCSNv2 score-model checkpoint (no begin_conv/res1 weights)')
    ngf, channels = (int(d) for d in state['begin_conv.weight'].shape[:2])
    if 'res31.0.conv1.weight' in state:
        return 'NCSNv2Deepest', ngf, channels
    if 'res5.0.conv1.weight' in state:
        return 'NCSNv2Deeper', ngf, channels
    return 'NCSNv2', ngf, channels


def expected_param_shapes(architecture: str, ngf: int, channels: int) -> dict:
    """Map each PyTorch key of the architecture to its PyTorch shape, from the Flax module."""
    module = create_model(architecture, ngf, channels)
    size = 2 ** (ARCHITECTURES[architecture].downsampling_steps() + 2)
    shapes = jax.eval_shape(module.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, size, size, channels), np.float32))
    flat = state_dict_from_params(jax.tree.map(lambda s: np.zeros(s.shape, np.float32),
                                               shapes['params']))
    return {k: tuple(v.shape) for k, v in flat.items()}


def check_state_matches(state: dict, expected: dict, path, what: str):
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != expected[k])
    problems = []
    if missing:
        problems.append(f'missing {len(missing)} keys (e.g. {", ".join(missing[:3])})')
    if unexpected:
        problems.append(f'unexpected {len(unexpected)} keys (e.g. {", ".join(unexpected[:3])})')
    if wrong:
        k = wrong[0]
        problems.append(f'{len(wrong)} shape mismatches (e.g. {k}: {tuple(state[k].shape)} '
                        f'instead of {expected[k]})')
    if problems:
        raise UserError(f'{path}: {what} does not fit the inferred architecture: '
                        + '; '.join(problems))


def score_model_from_checkpoint(ckpt: TorchCheckpoint, path, *, ema: bool = True):
    """Return (params, sigmas or None, architecture, ngf, channels, used_ema)."""
    state = dict(ckpt.model_state)
    sigmas = state.pop('sigmas', None)
    architecture, ngf, channels = infer_architecture(state, path)
    expected = expected_param_shapes(architecture, ngf, channels)
    check_state_matches(state, expected, path, 'the model state dict')
    used_ema = False
    if ema and ckpt.ema_shadow is not None:
        shadow = {k: v for k, v in ckpt.ema_shadow.items() if k != 'sigmas'}
        check_state_matches(shadow, expected, path, 'the EMA shadow')
        state = shadow
        used_ema = True
    params = params_from_state_dict({k: v.astype(np.float32) for k, v in state.items()})
    if sigmas is not None:
        sigmas = np.asarray(sigmas, np.float32)
    return params, sigmas, architecture, ngf, channels, used_ema


# ---------------------------------------------------------------------------------------------
# Whole files.

def _difference_from_existing(out: Path, source_sha256: str, options: dict) -> str | None:
    """Return how an existing output differs from what this conversion writes, or None.

    `--config` counts only when it supplied the sigma table, since otherwise it just checks.
    """
    try:
        metadata = checkpoint.read_params_file(out)['metadata']
    except UserError:
        return 'it is not an ncsn-jax parameter file'
    if metadata.get('source_sha256') != source_sha256:
        return f'it was made from other source bytes ({metadata.get("source_name")})'
    previous = dict(metadata.get('options') or {})
    if not metadata.get('sigmas_from_config'):
        previous['config'] = options['config']
    changed = sorted(k for k in set(previous) | set(options) if previous.get(k) != options.get(k))
    if changed:
        return 'other options: ' + ', '.join(f'{k} was {previous.get(k)!r}' for k in changed)
    return None


def _check_paths_and_hash(source: Path, out: Path) -> str:
    """Raise UserError for a missing source or a folder as output; return the source's SHA-256."""
    if not source.is_file():
        raise UserError(f'checkpoint not found: {source}; check the path')
    if out.is_dir():
        raise UserError(f'--out {out} is a folder; give a file path such as {out / "model.msgpack"}')
    return file_sha256(source)


def _output_is_up_to_date(out: Path, source_sha256: str, options: dict, force: bool) -> bool:
    """Return True when `out` already contains this conversion; raise unless `force` allows replacing."""
    if not out.exists():
        return False
    difference = _difference_from_existing(out, source_sha256, options)
    if difference is None:
        log.info('%s is up to date (same source SHA-256 and options); nothing to do', out)
        return True
    if not force:
        raise UserError(f'{out} already exists and differs ({difference}); pass --force to '
                        'replace it')
    return False


def _check_against_config(config, config_name, architecture, ngf, channels, source):
    expected = {'architecture': config.model.architecture, 'ngf': config.model.ngf,
                'channels': config.data.channels}
    found = {'architecture': architecture, 'ngf': ngf, 'channels': channels}
    for key, value in expected.items():
        if value != found[key]:
            raise UserError(f'{source} contains an {architecture} with ngf {ngf} and {channels} channels, '
                            f'but config {config_name} expects {key} {value}; pick the config that '
                            'matches the checkpoint')


def convert_file(source, out, *, ema: bool = True, config: str | None = None,
                 force: bool = False) -> str:
    """Convert a PyTorch score-model or FID Inception checkpoint into an ncsn-jax file.

    Returns 'written' or 'up-to-date' (the output exists and was made from the same source bytes
    with the same options, so nothing is done). Raises UserError for bad input, leaving `out`
    untouched.
    """
    source, out = Path(source), Path(out)
    options = {'no_ema': not ema, 'config': config, 'converter_version': CONVERTER_VERSION}
    source_sha256 = _check_paths_and_hash(source, out)
    if _output_is_up_to_date(out, source_sha256, options, force):
        return 'up-to-date'

    cfg = None
    if config is not None:
        from ncsn_jax.config import load_config
        cfg = load_config(config)

    obj = load_torch_file(source)
    metadata = {'source_name': source.name, 'source_sha256': source_sha256, 'options': options}

    from ncsn_jax import inception
    if isinstance(obj, dict) and _is_tensor_dict(obj) and inception.is_inception_state_dict(obj):
        if cfg is not None:
            raise UserError(f'{source} is an FID Inception checkpoint; --config applies to score '
                            'models only, so drop it')
        params = inception.inception_params_from_state_dict(_to_numpy(obj))
        metadata['architecture'] = inception.ARCHITECTURE
        checkpoint.write_params_file(out, kind='inception', params=params, metadata=metadata,
                                     overwrite=force)
        log.info('wrote FID Inception parameters to %s', out)
        return 'written'

    ckpt = split_checkpoint(obj, source)
    params, sigmas, architecture, ngf, channels, used_ema = score_model_from_checkpoint(
        ckpt, source, ema=ema)
    if cfg is not None:
        _check_against_config(cfg, config, architecture, ngf, channels, source)
    if sigmas is None:
        if cfg is None:
            raise UserError(f'{source} has no sigma table (no `sigmas` buffer); pass --config NAME '
                            'so that the geometric ladder of that config is stored')
        from ncsn_jax.config import sigma_ladder
        sigmas = np.asarray(sigma_ladder(cfg), np.float32)
        metadata['sigmas_from_config'] = True
    if ema and ckpt.ema_shadow is None:
        log.warning('%s has no EMA shadow; converting the raw model weights', source)
    metadata.update(architecture=architecture, ngf=ngf, channels=channels, ema=used_ema,
                    num_classes=int(sigmas.shape[0]), sigma_begin=float(sigmas[0]),
                    sigma_end=float(sigmas[-1]), epoch=ckpt.epoch, step=ckpt.step)
    if cfg is not None:
        metadata['image_size'] = cfg.data.image_size
    checkpoint.write_params_file(out, kind='score_model', params=params, metadata=metadata,
                                 extra={'sigmas': sigmas}, overwrite=force)
    log.info('wrote %s (ngf %d, %d channels, %d noise levels, %s weights) to %s', architecture, ngf,
             channels, sigmas.shape[0], 'EMA' if used_ema else 'raw', out)
    return 'written'


# ---------------------------------------------------------------------------------------------
# Training state: official checkpoints <-> train_state files, and export to the official layout.

# Registration order of the official NCSNv2 modules, which is the order of `model.parameters()`
# and of the state dict: siblings are ordered by their position here. RCU convolutions
# ('1_2_conv') and list items (digits) are ordered by their numbers.
TORCH_MODULE_ORDER = (
    'sigmas', 'begin_conv', 'normalizer', 'end_conv',
    'res1', 'res2', 'res3', 'res31', 'res4', 'res5',
    'refine1', 'refine2', 'refine3', 'refine31', 'refine4', 'refine5',
    # ResidualBlock
    'conv1', 'normalize2', 'conv2', 'shortcut', 'normalize1',
    # RefineBlock, MSFBlock, CRPBlock, ConvMeanPool
    'adapt_convs', 'output_convs', 'msf', 'crp', 'convs', 'conv',
    # tensors
    'weight', 'bias', 'alpha', 'gamma', 'beta',
)
_TORCH_RANK = {name: rank for rank, name in enumerate(TORCH_MODULE_ORDER)}
_RCU_CONV = re.compile(r'^(\d+)_(\d+)_conv$')


def _torch_order_key(key: str) -> tuple:
    parts = []
    for part in key.split('.'):
        rcu = _RCU_CONV.match(part)
        if part.isdigit():
            parts.append((0, int(part), 0))
        elif rcu:
            parts.append((1, int(rcu.group(1)), int(rcu.group(2))))
        elif part in _TORCH_RANK:
            parts.append((2, _TORCH_RANK[part], 0))
        else:
            raise ValueError(f'no known PyTorch registration order for {part!r} in {key!r}')
    return tuple(parts)


def torch_parameter_order(keys) -> list:
    """Sort state-dict keys (without `module.`) into the official NCSNv2 registration order."""
    return sorted(keys, key=_torch_order_key)


def _json_value(value):
    """Make an optimizer hyperparameter storable in the metadata (tuples become lists)."""
    if isinstance(value, (tuple, list)):
        return [_json_value(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def adam_state_from_torch(optimizer_state, param_keys: list, state: dict, path):
    """Map a `torch.optim.Adam` state dict to {'count', 'mu', 'nu'[, 'nu_max']} Flax trees.

    torch keys the per-parameter state by the index in `model.parameters()`, which is the order of
    `param_keys` (the state-dict keys without the `sigmas` buffer). Returns (adam tree or None,
    param group hyperparameters or None); None when the optimizer never stepped.
    """
    if not isinstance(optimizer_state, dict) or 'param_groups' not in optimizer_state:
        return None, None
    groups = optimizer_state['param_groups']
    if len(groups) != 1:
        raise UserError(f'{path}: the optimizer state has {len(groups)} parameter groups; the '
                        'official NCSNv2 optimizer has one')
    group = groups[0]
    if 'betas' not in group or 'eps' not in group:
        raise UserError(f'{path}: the optimizer state is not an Adam state (no betas or eps in '
                        'its parameter group); only Adam states can be converted')
    indices = list(group.get('params', []))
    if indices != list(range(len(param_keys))):
        raise UserError(f'{path}: the optimizer has {len(indices)} parameters, the model '
                        f'{len(param_keys)}; the optimizer state does not belong to this model')
    hyperparameters = {k: _json_value(v) for k, v in group.items() if k != 'params'}
    per_param = optimizer_state.get('state') or {}
    if not per_param:
        log.warning('%s: the Adam state is empty (the optimizer never stepped)', path)
        return None, hyperparameters

    amsgrad = bool(group.get('amsgrad', False))
    names = {'mu': 'exp_avg', 'nu': 'exp_avg_sq'}
    if amsgrad:
        names['nu_max'] = 'max_exp_avg_sq'
    moments = {name: {} for name in names}
    steps = set()
    for index, key in enumerate(param_keys):
        entry = per_param.get(index)
        if entry is None:
            raise UserError(f'{path}: the Adam state has no entry for parameter {index} ({key})')
        for name, torch_name in names.items():
            if torch_name not in entry:
                raise UserError(f'{path}: the Adam state of parameter {index} ({key}) has no '
                                f'{torch_name}')
            value = np.asarray(entry[torch_name])
            if value.shape != tuple(state[key].shape):
                raise UserError(f'{path}: Adam {torch_name} of parameter {index} has shape '
                                f'{value.shape}, but {key} has {tuple(state[key].shape)}; the '
                                'optimizer state does not match the model')
            moments[name][key] = value.astype(np.float32)
        steps.add(float(np.asarray(entry.get('step', 0))))
    if len(steps) != 1:
        raise UserError(f'{path}: the Adam step counts differ between parameters '
                        f'({sorted(steps)[:3]}...); a single count is required')
    adam = {'count': np.asarray(int(steps.pop()), np.int64)}
    adam.update({name: params_from_state_dict(values) for name, values in moments.items()})
    return adam, hyperparameters


def train_state_from_checkpoint(ckpt: TorchCheckpoint, path, *, sigmas=None) -> dict:
    """Return the train_state payload {'kind', 'params', 'metadata', 'extra'} of a checkpoint.

    The payload has the layout of `ncsn_jax.train_state` files: raw parameters, the EMA shadow,
    the Adam moments and step count, the epoch and step. `sigmas` is used when the checkpoint has
    no `sigmas` buffer.
    """
    state = dict(ckpt.model_state)
    stored_sigmas = state.pop('sigmas', None)
    if stored_sigmas is not None:
        sigmas = stored_sigmas
    if sigmas is None:
        raise UserError(f'{path} has no sigma table (no `sigmas` buffer); pass --config NAME so '
                        'that the geometric ladder of that config is stored')
    sigmas = np.asarray(sigmas, np.float32)
    architecture, ngf, channels = infer_architecture(state, path)
    expected = expected_param_shapes(architecture, ngf, channels)
    check_state_matches(state, expected, path, 'the model state dict')
    param_keys = list(state)

    extra = {'sigmas': sigmas}
    if ckpt.ema_shadow is not None:
        shadow = {k: v for k, v in ckpt.ema_shadow.items() if k != 'sigmas'}
        check_state_matches(shadow, expected, path, 'the EMA shadow')
        extra['ema_params'] = params_from_state_dict(
            {k: np.asarray(v, np.float32) for k, v in shadow.items()})
    adam, hyperparameters = adam_state_from_torch(ckpt.optimizer_state, param_keys, state, path)
    if adam is not None:
        extra['adam'] = adam

    metadata = {
        'architecture': architecture, 'ngf': ngf, 'channels': channels,
        'num_classes': int(sigmas.shape[0]), 'sigma_begin': float(sigmas[0]),
        'sigma_end': float(sigmas[-1]), 'step': int(ckpt.step or 0), 'epoch': int(ckpt.epoch or 0),
        'optimizer': hyperparameters, 'ema': ckpt.ema_shadow is not None,
        'torch_parameter_order': param_keys, 'sigmas_from_config': stored_sigmas is None,
    }
    params = params_from_state_dict({k: np.asarray(v, np.float32) for k, v in state.items()})
    return {'kind': 'train_state', 'params': params, 'metadata': metadata, 'extra': extra}


def convert_train_state_file(source, out, *, config: str | None = None,
                             force: bool = False) -> str:
    """Convert an official checkpoint with its Adam state and EMA shadow to a train_state file.

    Returns 'written' or 'up-to-date', like `convert_file`. Raises UserError for bad input,
    leaving `out` untouched.
    """
    from ncsn_jax import train_state

    source, out = Path(source), Path(out)
    options = {'train_state': True, 'config': config, 'converter_version': CONVERTER_VERSION}
    source_sha256 = _check_paths_and_hash(source, out)
    if _output_is_up_to_date(out, source_sha256, options, force):
        return 'up-to-date'

    cfg = config_sigmas = None
    if config is not None:
        from ncsn_jax.config import load_config, sigma_ladder
        cfg = load_config(config)
        config_sigmas = sigma_ladder(cfg)
    ckpt = split_checkpoint(load_torch_file(source), source)
    payload = train_state_from_checkpoint(ckpt, source, sigmas=config_sigmas)
    metadata = payload['metadata']
    if cfg is not None:
        _check_against_config(cfg, config, metadata['architecture'], metadata['ngf'],
                              metadata['channels'], source)
        metadata['image_size'] = cfg.data.image_size
    metadata.update(source_name=source.name, source_sha256=source_sha256, options=options)
    extra = payload['extra']
    train_state.write_train_state_file(out, params=payload['params'], sigmas=extra['sigmas'],
                                       metadata=metadata, ema_params=extra.get('ema_params'),
                                       adam=extra.get('adam'), overwrite=force)
    log.info('wrote the training state of %s (%s, ngf %d, step %d, %s, %s) to %s', source,
             metadata['architecture'], metadata['ngf'], metadata['step'],
             'Adam state' if 'adam' in extra else 'no Adam state',
             'EMA shadow' if 'ema_params' in extra else 'no EMA shadow', out)
    return 'written'


def _tensor(value):
    import torch
    return torch.from_numpy(np.array(value, np.float32, copy=True))


def official_checkpoint_from_payload(payload: dict, path) -> list:
    """Build the official list [model_state, optimizer_state, epoch, step, ema_shadow] (torch).

    `payload` is a decoded score_model or train_state file. Model keys get the `module.` prefix
    and the `sigmas` buffer comes first, as `torch.nn.DataParallel` saves them. A score_model file
    contains one set of weights, which becomes both the model state and the EMA shadow. Its
    optimizer state is empty ({'state': {}, 'param_groups': []}), so official training cannot
    resume from it. A train_state file without an EMA shadow gives a list of four items, as the official code
    writes when EMA is off.
    """
    import collections

    kind = payload.get('kind')
    if kind not in ('score_model', 'train_state'):
        raise UserError(f'{path} is a {kind!r} file, but only score_model and train_state files '
                        'can be exported to PyTorch')
    metadata, extra = payload['metadata'], payload['extra']
    state = state_dict_from_params(payload['params'])
    architecture, ngf, channels = infer_architecture(state, path)
    check_state_matches(state, expected_param_shapes(architecture, ngf, channels), path,
                        'the parameters')
    order = metadata.get('torch_parameter_order')
    if not order or sorted(order) != sorted(state):
        order = torch_parameter_order(state)

    model_state = collections.OrderedDict()
    model_state['module.sigmas'] = _tensor(extra['sigmas'])
    for key in order:
        model_state['module.' + key] = _tensor(state[key])

    if kind == 'score_model':
        shadow = collections.OrderedDict((key, _tensor(state[key])) for key in order)
        optimizer_state = {'state': {}, 'param_groups': []}
        return [model_state, optimizer_state, int(metadata.get('epoch') or 0),
                int(metadata.get('step') or 0), shadow]

    optimizer_state = _torch_optimizer_state(metadata.get('optimizer'), extra.get('adam'), order)
    result = [model_state, optimizer_state, int(metadata.get('epoch') or 0),
              int(metadata.get('step') or 0)]
    if 'ema_params' in extra:
        ema = state_dict_from_params(extra['ema_params'])
        result.append(collections.OrderedDict((key, _tensor(ema[key])) for key in order))
    return result


def _torch_optimizer_state(hyperparameters, adam, order) -> dict:
    import torch

    group = dict(hyperparameters or {})
    if 'betas' in group:
        group['betas'] = tuple(group['betas'])
    group['params'] = list(range(len(order)))
    per_param = {}
    if adam is not None:
        names = {'exp_avg': 'mu', 'exp_avg_sq': 'nu'}
        if 'nu_max' in adam:
            names['max_exp_avg_sq'] = 'nu_max'
        flat = {torch_name: state_dict_from_params(adam[name]) for torch_name, name in names.items()}
        count = float(np.asarray(adam['count']))
        for index, key in enumerate(order):
            entry = {'step': torch.tensor(count, dtype=torch.float32)}
            for torch_name in names:
                entry[torch_name] = _tensor(flat[torch_name][key])
            per_param[index] = entry
    return {'state': per_param, 'param_groups': [group] if hyperparameters else []}


def export_file(source, out, *, force: bool = False) -> Path:
    """Write an ncsn-jax score_model or train_state file as an official PyTorch checkpoint.

    The file is written atomically with `torch.save`. Raises UserError when `out` exists and
    `force` is false, or when `source` is not an exportable file.
    """
    import io

    from ncsn_jax.fileio import atomic_write_bytes

    torch = import_torch('writing PyTorch checkpoints')
    source, out = Path(source), Path(out)
    if out.exists() and out.is_dir():
        raise UserError(f'--out {out} is a folder; give a file path such as {out / "model.pth"}')
    if out.exists() and not force:
        raise UserError(f'{out} already exists; pass --force to replace it')
    payload = checkpoint.read_params_file(source)
    obj = official_checkpoint_from_payload(payload, source)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(out, buffer.getvalue(), overwrite=force)
    log.info('wrote %s (%s file, step %d) as an official PyTorch checkpoint to %s', source,
             payload['kind'], obj[3], out)
    return out
