"""Experiment configuration: YAML files read into frozen, validated dataclasses.

Section and key names are those of the official NCSNv2 configs (data, model, sampling, training,
optim, fast_fid, test) and of the PyTorch PIDLD project (the PID gains in `sampling`, and the
`visualization` and `evaluation` sections). Official NCSNv2 config files load unchanged. A key
given twice in one mapping is an error here, although PyYAML would keep the last value, so the
PIDLD configs, which repeat `evaluation.freq`, need one of those lines removed.

Every problem is raised as a one-line `UserError` that names the file, the key path, the value
and the valid range.
"""

import dataclasses
import difflib
import math
import numbers
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ncsn_jax.errors import UserError

ARCHITECTURES = ('NCSNv2', 'NCSNv2Deeper', 'NCSNv2Deepest')

# Number of stride-2 downsamplings in each architecture: NCSNv2 halves the resolution in res2 only,
# NCSNv2Deeper in res2 and res3, NCSNv2Deepest in res2, res3 and res31. The later "down" blocks
# use dilated convolutions and keep the resolution.
ARCHITECTURE_HALVINGS = {'NCSNv2': 1, 'NCSNv2Deeper': 2, 'NCSNv2Deepest': 3}

OPTIMIZERS = ('Adam', 'RMSProp', 'SGD')

DEFAULT_INCEPTION_PARAMS_PATH = 'model_weights/inception/pt_inception-2015-12-05-6726825d.msgpack'

CONFIG_SUFFIXES = ('.yml', '.yaml')


# ---------------------------------------------------------------------------------------------
# Field specifications


@dataclass(frozen=True)
class _Check:
    """A constraint on a converted value. Error messages read "must be <description>"."""

    predicate: Any
    description: str


_POSITIVE = _Check(lambda v: v > 0, '> 0')
_NON_NEGATIVE = _Check(lambda v: v >= 0, '>= 0')
_OPEN_UNIT = _Check(lambda v: 0 < v < 1, 'in (0, 1)')
_HALF_OPEN_UNIT = _Check(lambda v: 0 <= v < 1, 'in [0, 1)')

_REQUIRED = MISSING


def _option(value_type, default=_REQUIRED, *, optional=False, check=None):
    """Declare a config key: its YAML type, default (none means required) and constraint.

    `optional` allows null. A float key also accepts an integer, and a string such as '2e-5',
    because PyYAML (YAML 1.1) reads a number with an exponent but no dot as a string.
    """
    metadata = {'type': value_type, 'optional': optional, 'check': check}
    if default is _REQUIRED:
        return field(metadata=metadata)
    return field(default=default, metadata=metadata)


# ---------------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Section `data`. Only dataset, image_size and channels affect sampling.

    The other keys are official NCSNv2 training options, kept for training and for round trips.
    `path` (an ncsn-jax key) names the training images: a folder of PNG/JPEG files or an `.npz`
    file, relative to the working directory. The trainer's `--data` flag overrides it.
    """

    dataset: str = _option(str)
    image_size: int = _option(int, check=_POSITIVE)
    channels: int = _option(int, check=_Check(lambda v: v in (1, 3), '1 or 3'))
    category: str | None = _option(str, None, optional=True)
    path: str | None = _option(str, None, optional=True)
    logit_transform: bool = _option(bool, False, check=_Check(
        lambda v: v is False, 'false (ncsn-jax models take images in [0, 1], rescaled to 2x - 1)'))
    uniform_dequantization: bool = _option(bool, False)
    gaussian_dequantization: bool = _option(bool, False)
    random_flip: bool = _option(bool, True)
    rescaled: bool = _option(bool, False, check=_Check(
        lambda v: v is False, 'false (ncsn-jax models take images in [0, 1], rescaled to 2x - 1)'))
    num_workers: int = _option(int, 0, check=_NON_NEGATIVE)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Section `model`: the score network and its noise levels.

    When `architecture` is missing or null, `load_config` fills in the official NCSNv2 choice for
    the dataset (see `default_architecture`). Paths are relative to the working directory.
    """

    architecture: str | None = _option(str, None, optional=True, check=_Check(
        lambda v: v in ARCHITECTURES, 'one of ' + ', '.join(repr(a) for a in ARCHITECTURES)))
    ngf: int = _option(int, check=_POSITIVE)
    sigma_begin: float = _option(float, check=_POSITIVE)
    sigma_end: float = _option(float, check=_POSITIVE)
    num_classes: int = _option(int, check=_Check(
        lambda v: v >= 2, '>= 2 (the ladder runs from sigma_begin to sigma_end)'))
    ema: bool = _option(bool, True)
    ema_rate: float = _option(float, 0.999, check=_OPEN_UNIT)
    spec_norm: bool = _option(bool, False, check=_Check(
        lambda v: v is False, 'false (ncsn-jax implements no spectral normalization)'))
    normalization: str = _option(str, 'InstanceNorm++', check=_Check(
        lambda v: v == 'InstanceNorm++', "'InstanceNorm++' (the only normalization ncsn-jax implements)"))
    nonlinearity: str = _option(str, 'elu', check=_Check(
        lambda v: v.lower() == 'elu', "'elu' (the only activation ncsn-jax implements)"))
    sigma_dist: str = _option(str, 'geometric', check=_Check(
        lambda v: v == 'geometric', "'geometric' (the only noise ladder ncsn-jax implements)"))
    score_model_state_dict_path: str | None = _option(str, None, optional=True)
    params_path: str | None = _option(str, None, optional=True)


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """Section `sampling`: PID-controlled annealed Langevin dynamics and sample snapshots.

    The step size at level i is step_lr * (sigma_i / sigma_end)**2. With k_p 1 and k_i = k_d = 0
    the sampler is plain annealed Langevin dynamics. k_i and k_d are multiplied by their decays
    after every step. When `n_samples` is missing or null, `load_config` sets it to `batch_size`.
    `freq` counts global steps between snapshots, which are saved only when `last_only` is false.
    The keys from `data_init` on are official NCSNv2 keys that ncsn-jax accepts and ignores.
    """

    batch_size: int = _option(int, check=_POSITIVE)
    step_lr: float = _option(float, check=_POSITIVE)
    n_steps_each: int = _option(int, check=_POSITIVE)
    denoise: bool = _option(bool, True)
    n_samples: int | None = _option(int, None, optional=True, check=_POSITIVE)
    k_p: float = _option(float, 1.0)
    k_i: float = _option(float, 0.0)
    k_d: float = _option(float, 0.0)
    k_i_decay: float = _option(float, 1.0, check=_POSITIVE)
    k_d_decay: float = _option(float, 1.0, check=_POSITIVE)
    save: bool = _option(bool, True)
    last_only: bool = _option(bool, True)
    freq: int = _option(int, 100, check=_POSITIVE)
    verbose: bool = _option(bool, True)
    data_init: bool | None = _option(bool, None, optional=True)
    ckpt_id: int | None = _option(int, None, optional=True)
    final_only: bool | None = _option(bool, None, optional=True)
    fid: bool | None = _option(bool, None, optional=True)
    num_samples4fid: int | None = _option(int, None, optional=True, check=_POSITIVE)
    inpainting: bool | None = _option(bool, None, optional=True, check=_Check(
        lambda v: v is False, 'false or absent (ncsn-jax does not implement inpainting)'))
    interpolation: bool | None = _option(bool, None, optional=True, check=_Check(
        lambda v: v is False, 'false or absent (ncsn-jax does not implement interpolation)'))
    n_interpolations: int | None = _option(int, None, optional=True, check=_POSITIVE)


@dataclass(frozen=True, kw_only=True)
class VisualizationConfig:
    """Section `visualization`: image grids of the first nrow * nrow samples, every `freq` steps."""

    save: bool = _option(bool, True)
    last_only: bool = _option(bool, False)
    freq: int = _option(int, 5, check=_POSITIVE)
    nrow: int = _option(int, 8, check=_POSITIVE)
    verbose: bool = _option(bool, True)


@dataclass(frozen=True, kw_only=True)
class EvaluationConfig:
    """Section `evaluation`: FID and Inception Score of the samples.

    `inception_stats_path` is required when `evaluate` is true. `inception_params_path` defaults
    to the converted pytorch-fid Inception file under model_weights/inception/. `num_workers` is a
    PyTorch DataLoader option of the PIDLD project that ncsn-jax accepts and ignores.
    """

    inception_stats_path: str | None = _option(str, None, optional=True)
    inception_params_path: str | None = _option(str, DEFAULT_INCEPTION_PARAMS_PATH, optional=True)
    batch_size: int = _option(int, 64, check=_POSITIVE)
    num_workers: int = _option(int, 0, check=_NON_NEGATIVE)
    freq: int = _option(int, 100, check=_POSITIVE)
    evaluate: bool = _option(bool, False)
    last_only: bool = _option(bool, True)
    verbose: bool = _option(bool, True)


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """Section `training`, with the official NCSNv2 CIFAR-10 values as defaults."""

    batch_size: int = _option(int, 128, check=_POSITIVE)
    n_epochs: int = _option(int, 500000, check=_POSITIVE)
    n_iters: int = _option(int, 300001, check=_POSITIVE)
    snapshot_freq: int = _option(int, 5000, check=_POSITIVE)
    snapshot_sampling: bool = _option(bool, True)
    anneal_power: float = _option(float, 2.0, check=_NON_NEGATIVE)
    log_all_sigmas: bool = _option(bool, False)


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """Section `optim`, with the official NCSNv2 CIFAR-10 values as defaults.

    As in the official `get_optimizer`, Adam uses betas (beta1, 0.999), and beta1, eps and amsgrad
    apply to Adam only.
    """

    weight_decay: float = _option(float, 0.0, check=_NON_NEGATIVE)
    optimizer: str = _option(str, 'Adam', check=_Check(
        lambda v: v in OPTIMIZERS, 'one of ' + ', '.join(repr(o) for o in OPTIMIZERS)))
    lr: float = _option(float, 0.0001, check=_POSITIVE)
    beta1: float = _option(float, 0.9, check=_HALF_OPEN_UNIT)
    amsgrad: bool = _option(bool, False)
    eps: float = _option(float, 1e-8, check=_POSITIVE)


@dataclass(frozen=True, kw_only=True)
class Config:
    """A whole experiment configuration.

    `fast_fid` and `test` are official NCSNv2 sections, kept as plain dicts (or None when absent)
    and unused. `source` is the file the config came from. It is left out of comparisons and of
    `config_to_dict`.
    """

    data: DataConfig
    model: ModelConfig
    sampling: SamplingConfig
    visualization: VisualizationConfig = field(default_factory=VisualizationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    fast_fid: dict | None = None
    test: dict | None = None
    source: str = field(default='<dict>', compare=False)


SECTIONS = {
    'data': DataConfig,
    'model': ModelConfig,
    'sampling': SamplingConfig,
    'visualization': VisualizationConfig,
    'evaluation': EvaluationConfig,
    'training': TrainingConfig,
    'optim': OptimConfig,
}
REQUIRED_SECTIONS = ('data', 'model', 'sampling')
PLAIN_SECTIONS = ('fast_fid', 'test')

# Keyword arguments of `apply_overrides` and the config key that each one sets.
OVERRIDE_KEYS = {
    'k_p': ('sampling', 'k_p'),
    'k_i': ('sampling', 'k_i'),
    'k_d': ('sampling', 'k_d'),
    'k_i_decay': ('sampling', 'k_i_decay'),
    'k_d_decay': ('sampling', 'k_d_decay'),
    'n_steps_each': ('sampling', 'n_steps_each'),
    'step_lr': ('sampling', 'step_lr'),
    'batch_size': ('sampling', 'batch_size'),
    'n_samples': ('sampling', 'n_samples'),
    'denoise': ('sampling', 'denoise'),
    'num_classes': ('model', 'num_classes'),
}


# ---------------------------------------------------------------------------------------------
# Value conversion


_TYPE_NAMES = {int: 'an integer', float: 'a number', bool: 'true or false', str: 'a string'}


def _convert_value(value, spec, key_path, source):
    """Return `value` converted to the type in `spec`, or raise UserError naming the key path."""
    value_type = spec['type']
    if value is None:
        if spec['optional']:
            return None
        raise UserError(f'{source}: {key_path} must be {_TYPE_NAMES[value_type]}, got null')

    converted = _convert_type(value, value_type)
    if converted is None:
        raise UserError(f'{source}: {key_path} must be {_TYPE_NAMES[value_type]}, got {value!r}')

    check = spec['check']
    if check is not None and not check.predicate(converted):
        raise UserError(f'{source}: {key_path} must be {check.description}, got {converted!r}')
    return converted


def _convert_type(value, value_type):
    """Return `value` as `value_type`, or None when it has another type.

    Booleans never count as numbers. NumPy scalars count as Python numbers. An integer key also
    accepts a float with an integral value (1.0e+4). A float key rejects NaN and infinities.
    """
    if value_type is bool or value_type is str:
        return value if isinstance(value, value_type) else None
    if isinstance(value, (bool, np.bool_)):
        return None

    if value_type is int:
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, numbers.Real) and float(value).is_integer():
            return int(value)
        return None

    if not isinstance(value, (numbers.Real, str)):
        return None
    try:
        value = float(value)
    except (ValueError, OverflowError):
        return None
    return value if math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------
# Building and validating


def _parse_section(raw, section_type, section, source):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f'{source}: section {section!r} must be a mapping of keys to values, got {raw!r}')

    specs = {f.name: f for f in fields(section_type)}
    for key in raw:
        if key not in specs:
            raise UserError(f'{source}: unknown key {section}.{key}{_suggestion(key, specs)}. '
                            f'Known keys: {", ".join(specs)}')

    values = {}
    for name, spec in specs.items():
        key_path = f'{section}.{name}'
        if name in raw:
            values[name] = _convert_value(raw[name], spec.metadata, key_path, source)
        elif spec.default is MISSING:
            raise UserError(f'{source}: missing required key {key_path}')
    return section_type(**values)


def _suggestion(key, known):
    matches = difflib.get_close_matches(str(key), list(known), n=1)
    return f' (did you mean {matches[0]!r}?)' if matches else ''


def default_architecture(dataset: str) -> str:
    """Return the architecture that the official NCSNv2 `get_model` builds for `dataset`.

    LSUN gets NCSNv2Deeper and FFHQ NCSNv2Deepest. CIFAR10, CELEBA and every other dataset
    (the official code builds nothing for those) get NCSNv2. The comparison ignores case.
    """
    name = dataset.upper()
    if name == 'LSUN':
        return 'NCSNv2Deeper'
    if name == 'FFHQ':
        return 'NCSNv2Deepest'
    return 'NCSNv2'


def config_from_dict(raw, source='<dict>') -> Config:
    """Build and validate a Config from a dict shaped like a config file; `source` prefixes errors."""
    if raw is None:
        raise UserError(f'{source}: the config is empty. Expected the sections {", ".join(REQUIRED_SECTIONS)}')
    if not isinstance(raw, dict):
        raise UserError(f'{source}: a config must be a mapping of sections, got {type(raw).__name__}')

    known = list(SECTIONS) + list(PLAIN_SECTIONS)
    for section in raw:
        if section not in known:
            raise UserError(f'{source}: unknown section {section!r}{_suggestion(section, known)}. '
                            f'Known sections: {", ".join(known)}')
    for section in REQUIRED_SECTIONS:
        if section not in raw:
            raise UserError(f'{source}: missing required section {section!r}')

    sections = {name: _parse_section(raw[name], section_type, name, source)
                for name, section_type in SECTIONS.items() if name in raw}
    for name in PLAIN_SECTIONS:
        value = raw.get(name)
        if value is not None and not isinstance(value, dict):
            raise UserError(f'{source}: section {name!r} must be a mapping of keys to values, got {value!r}')
        sections[name] = value

    sections = _fill_defaults(sections)
    _validate_relations(sections, source)
    return Config(**sections, source=source)


def _fill_defaults(sections):
    """Fill in the defaults that depend on other keys: model.architecture and sampling.n_samples."""
    model = sections['model']
    if model.architecture is None:
        architecture = default_architecture(sections['data'].dataset)
        sections['model'] = dataclasses.replace(model, architecture=architecture)

    sampling = sections['sampling']
    if sampling.n_samples is None:
        sections['sampling'] = dataclasses.replace(sampling, n_samples=sampling.batch_size)
    return sections


def _validate_relations(sections, source):
    """Check the constraints that involve more than one key."""
    model = sections['model']
    if not model.sigma_begin > model.sigma_end:
        raise UserError(f'{source}: model.sigma_begin must be > model.sigma_end ({model.sigma_end!r}), '
                        f'got {model.sigma_begin!r}')

    image_size = sections['data'].image_size
    halvings = ARCHITECTURE_HALVINGS[model.architecture]
    factor = 2 ** halvings
    if image_size % factor != 0:
        raise UserError(f'{source}: data.image_size must be divisible by {factor} for {model.architecture}, '
                        f'which halves the resolution {halvings} time(s), got {image_size}')

    evaluation = sections.get('evaluation')
    if evaluation is not None and evaluation.evaluate:
        for key in ('inception_stats_path', 'inception_params_path'):
            if getattr(evaluation, key) is None:
                raise UserError(f'{source}: evaluation.{key} is required when evaluation.evaluate is true')


# ---------------------------------------------------------------------------------------------
# Files


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that rejects a key given twice in one mapping.

    Plain `yaml.safe_load` keeps the last value silently. Keys brought in by a `<<` merge may still
    be overridden, as YAML allows.
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == 'tag:yaml.org,2002:merge' or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f'duplicate key {key!r}', key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path, source: str):
    try:
        text = path.read_text(encoding='utf-8')
    except OSError as exc:
        raise UserError(f'{source}: failed to read the config file: {exc.strerror or exc}') from exc
    except UnicodeDecodeError as exc:
        raise UserError(f'{source}: the config file is not UTF-8 text ({exc.reason})') from exc

    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f' at line {mark.line + 1}, column {mark.column + 1}' if mark is not None else ''
        raise UserError(f'{source}: invalid YAML{where}: {exc.problem}') from exc
    except yaml.YAMLError as exc:
        raise UserError(f'{source}: invalid YAML: {exc}') from exc


def repository_config_dir() -> Path:
    """Return the `configs/` folder beside the `ncsn_jax` package directory."""
    return Path(__file__).resolve().parent.parent / 'configs'


def _config_dirs():
    return [Path('configs'), repository_config_dir()]


def available_config_names() -> list[str]:
    """Return the sorted file names of the configs that `load_config` finds by name."""
    names = set()
    for folder in _config_dirs():
        if folder.is_dir():
            names.update(p.name for p in folder.iterdir() if p.suffix in CONFIG_SUFFIXES and p.is_file())
    return sorted(names)


def resolve_config_path(name_or_path) -> Path:
    """Return the file that `load_config` reads for `name_or_path`.

    A plain file name (no folder part) is looked up in `configs/` under the working directory,
    then in the repository's `configs/`. A name without a suffix also matches 'NAME.yml' and
    'NAME.yaml'. Anything else is used as a path. Raises UserError when no file is found.
    """
    text = str(name_or_path)
    path = Path(text)
    if path.name != text or text in ('.', '..'):
        if not path.is_file():
            raise UserError(f'config file not found: {text}')
        return path

    candidates = [text] if path.suffix else [text] + [text + suffix for suffix in CONFIG_SUFFIXES]
    for folder in _config_dirs():
        for candidate in candidates:
            if (folder / candidate).is_file():
                return folder / candidate

    available = ', '.join(available_config_names()) or 'none'
    raise UserError(f'config {text!r} not found in ./configs or {repository_config_dir()}. '
                    f'Available configs: {available}')


def load_config(name_or_path) -> Config:
    """Read, validate and return a config given by name (see `resolve_config_path`) or path."""
    path = resolve_config_path(name_or_path)
    source = str(path)
    return config_from_dict(_read_yaml(path, source), source)


def config_to_dict(config: Config) -> dict:
    """Return the config as nested plain dicts that `yaml.safe_dump` writes and `load_config` reads.

    Filled-in defaults are written out. `fast_fid` and `test` appear only when present.
    """
    result = {}
    for name in SECTIONS:
        result[name] = dataclasses.asdict(getattr(config, name))
    for name in PLAIN_SECTIONS:
        value = getattr(config, name)
        if value is not None:
            result[name] = dict(value)
    return result


def apply_overrides(config: Config, *, k_p=None, k_i=None, k_d=None, k_i_decay=None, k_d_decay=None,
                    n_steps_each=None, step_lr=None, batch_size=None, n_samples=None, denoise=None,
                    num_classes=None) -> Config:
    """Return a copy of `config` with the given values set, validated again.

    None keeps the config's value. `num_classes` sets model.num_classes and the other arguments
    the sampling key of the same name. An invalid value raises UserError naming that key.
    """
    requested = {'k_p': k_p, 'k_i': k_i, 'k_d': k_d, 'k_i_decay': k_i_decay, 'k_d_decay': k_d_decay,
                 'n_steps_each': n_steps_each, 'step_lr': step_lr, 'batch_size': batch_size,
                 'n_samples': n_samples, 'denoise': denoise, 'num_classes': num_classes}
    raw = config_to_dict(config)
    changed = False
    for name, value in requested.items():
        if value is None:
            continue
        section, key = OVERRIDE_KEYS[name]
        raw[section][key] = value
        changed = True
    if not changed:
        return config

    updated = config_from_dict(raw, f'{config.source} with overrides')
    return dataclasses.replace(updated, source=config.source)


def sigma_ladder(config: Config) -> np.ndarray:
    """Return the noise levels sigma_1 > ... > sigma_L as float32, largest first.

    Computed as the official NCSNv2 `get_sigmas` does for 'geometric': in float64,
    exp(linspace(log(sigma_begin), log(sigma_end), num_classes)), then rounded to float32.
    """
    model = config.model
    log_sigmas = np.linspace(np.log(model.sigma_begin), np.log(model.sigma_end), model.num_classes)
    return np.exp(log_sigmas).astype(np.float32)
