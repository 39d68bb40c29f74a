"""Train an NCSNv2 score model with denoising score matching, as the official NCSNv2 code does.

    python -m ncsn_jax.train --config CONFIG [--exp DIR] [--data PATH] [--n_iters N] [--seed S]
    python -m ncsn_jax.train --resume RUN_DIR [--n_iters N]
    python -m ncsn_jax.train --config CONFIG --init-from CHECKPOINT [...]

Each step draws a batch, noise-level labels uniform over the ladder and z ~ N(0, I). It minimises
the batch mean of 1/2 * sum_pixels (score(x + sigma z, sigma) + z / sigma)^2 * sigma^anneal_power
with Adam (torch's arithmetic), then updates the EMA shadow. Every random draw derives from the
seed and the step number, so a resumed run repeats a straight run bit for bit.

Layout of a run folder (EXP/train_<config name>_<time>/):

    config.yml, args.yml, stdout.txt, train_log.csv (step,loss)
    checkpoints/checkpoint_<step>.msgpack   train_state files every training.snapshot_freq steps
    checkpoints/checkpoint.msgpack          the latest of them, read by --resume
    score_model.msgpack                     the EMA (or raw) weights, for main.py's model.params_path
    samples/image_grid_<step>.png           snapshot samples when training.snapshot_sampling is true
"""

import argparse
import dataclasses
import functools
import logging
import logging.handlers
import shlex
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ncsn_jax import checkpoint, train_state
from ncsn_jax.cli import run_main, setup_logging
from ncsn_jax.errors import UserError
from ncsn_jax.fileio import atomic_write_text

log = logging.getLogger('ncsn_jax.train')

DEFAULT_SEED = 1234
SNAPSHOT_SAMPLE_COUNT = 36  # as the official snapshot sampling: a 6 x 6 grid
LOG_EVERY = 100
TRAINER_VERSION = 1

# Independent random streams derived from the seed. The step stream is folded with the step number.
INIT_STREAM, DATA_STREAM, STEP_STREAM, SAMPLE_STREAM = range(4)


# ---------------------------------------------------------------------------------------------
# Loss and step


def dsm_loss(module, params, x, labels, z, sigmas, anneal_power):
    """Return the NCSNv2 denoising score-matching loss for given labels and noise `z`.

    Per sample: 1/2 * sum over pixels of (score(x + sigma z) - target)^2 * sigma^anneal_power with
    target = -z / sigma, then the mean over the batch. The order of operations is the official one.
    """
    n = x.shape[0]
    used_sigmas = sigmas[labels].reshape(n, 1, 1, 1)
    noise = z * used_sigmas
    perturbed = x + noise
    target = -1.0 / used_sigmas ** 2 * noise
    scores = module.apply({'params': params}, perturbed) / used_sigmas
    squared_error = jnp.sum(jnp.square(scores - target).reshape(n, -1), axis=-1)
    loss = 0.5 * squared_error * used_sigmas.reshape(n) ** anneal_power
    return loss.mean()


def apply_step(state: train_state.TrainState, x, labels, z, sigmas, *, module, optimizer,
               anneal_power: float, ema_rate: float):
    """Run one optimizer step and the EMA update on a given batch, labels and noise.

    Returns (new state, loss before the step).
    """
    loss_fn = functools.partial(dsm_loss, module)
    loss, grads = jax.value_and_grad(loss_fn)(state.params, x, labels, z, sigmas, anneal_power)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = state.ema_params
    if ema_params is not None:
        ema_params = train_state.update_ema(ema_params, params, ema_rate)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema_params)
    return new_state, loss


def train_step(state, x, step_key, sigmas, *, module, optimizer, anneal_power, ema_rate,
               augmentation):
    """Draw the step's augmentation, labels and noise from fold_in(step_key, step), then step."""
    key = jax.random.fold_in(step_key, state.step)
    augment_key, label_key, noise_key = jax.random.split(key, 3)
    x = augmentation(augment_key, x)
    labels = jax.random.randint(label_key, (x.shape[0],), 0, sigmas.shape[0])
    z = jax.random.normal(noise_key, x.shape, x.dtype)
    return apply_step(state, x, labels, z, sigmas, module=module, optimizer=optimizer,
                      anneal_power=anneal_power, ema_rate=ema_rate)


def step_compiler_options(platform: str) -> dict:
    """Return the XLA options for compiling a training step on `platform` ('cpu', 'gpu', 'tpu').

    On the CPU, XLA's platform-dependent math is turned off. With it on (the default of
    jax 0.10.2), the gradients of a CIFAR-10 NCSNv2 batch differ from a float64 computation by
    8.5e-5 (relative L2), against 4e-7 with it off. `bench/train_step.py` measures the time it
    costs (3% per step on a 2-core CPU).
    """
    if platform == 'cpu':
        return {'xla_cpu_enable_platform_dependent_math': False}
    return {}


def compile_train_step(mesh: Mesh, **settings):
    """Jit `train_step` with the batch sharded over the mesh and everything else replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    batch = NamedSharding(mesh, PartitionSpec('data'))
    step = functools.partial(train_step, **settings)
    return jax.jit(step, in_shardings=(replicated, batch, replicated, replicated),
                   out_shardings=(replicated, replicated), donate_argnums=(0,),
                   compiler_options=step_compiler_options(mesh.devices.flat[0].platform))


def local_mesh() -> Mesh:
    """Return a one-axis ('data') mesh over the local devices (one device works too)."""
    return Mesh(np.array(jax.local_devices()), ('data',))


# ---------------------------------------------------------------------------------------------
# Building the state


def check_model_matches(metadata: dict, config, source):
    """Raise UserError when a stored model's architecture, ngf or channels differ from the config."""
    expected = {'architecture': config.model.architecture, 'ngf': config.model.ngf,
                'channels': config.data.channels}
    for key, value in expected.items():
        if metadata.get(key) != value:
            raise UserError(f'{source} contains a model with {key} {metadata.get(key)}, but '
                            f'{config.source} sets {value}; use the matching config')


def check_sigmas_match(stored, expected, source, config):
    stored = np.asarray(stored, np.float32)
    if stored.shape != expected.shape or not np.allclose(stored, expected, rtol=1e-6, atol=0):
        raise UserError(
            f'{source} was trained with {stored.shape[0]} noise levels from {stored[0]:.6g} to '
            f'{stored[-1]:.6g}, but {config.source} gives {expected.shape[0]} levels from '
            f'{expected[0]:.6g} to {expected[-1]:.6g}; set model.sigma_begin, sigma_end and '
            'num_classes to the checkpoint\'s values')


def state_from_payload(payload: dict, optimizer, *, ema: bool, source='the checkpoint'):
    """Build a TrainState from a train_state or score_model payload (see `ncsn_jax.train_state`).

    A score_model payload gives the parameters only: Adam starts fresh, the EMA shadow starts as a
    copy of the parameters and the step count at 0.
    """
    params = jax.tree.map(jnp.asarray, payload['params'])
    extra = payload['extra']
    if payload.get('kind') == 'score_model':
        return train_state.create_train_state(params, optimizer, ema=ema)
    step = int(payload['metadata']['step'])
    opt_state = None
    if 'adam' in extra:
        opt_state = train_state.opt_state_from_tree(optimizer, params, extra['adam'])
    else:
        log.warning('%s contains no optimizer state; Adam starts from zero moments', source)
    ema_params = extra.get('ema_params')
    if ema and ema_params is None:
        log.warning('%s contains no EMA shadow, so the shadow starts as a copy of the parameters',
                    source)
    return train_state.create_train_state(params, optimizer, ema=ema, step=step,
                                          opt_state=opt_state, ema_params=ema_params)


def read_init_checkpoint(path) -> dict:
    """Read --init-from: an ncsn-jax `.msgpack` file (train_state or score_model) or a PyTorch file."""
    path = Path(path)
    if path.suffix == '.msgpack':
        payload = checkpoint.read_params_file(path)
        if payload['kind'] not in ('train_state', 'score_model'):
            raise UserError(f'{path} is a {payload["kind"]!r} file, but --init-from needs a '
                            'train_state or score_model file, or an official .pth checkpoint')
        return payload
    from ncsn_jax import convert
    ckpt = convert.split_checkpoint(convert.load_torch_file(path), path)
    return convert.train_state_from_checkpoint(ckpt, path)


def warn_optimizer_differences(stored: dict | None, settings: train_state.AdamSettings, source):
    if not stored:
        return
    wanted = settings.torch_param_group()
    for key in ('lr', 'betas', 'eps', 'weight_decay'):
        if key in stored and list(np.atleast_1d(stored[key])) != list(np.atleast_1d(wanted[key])):
            log.warning('%s used Adam %s %s; continuing with %s from the config', source, key,
                        stored[key], wanted[key])


# ---------------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class RunSetup:
    """Everything a run needs, checked before anything is written."""

    config: object
    dataset: object
    module: object
    sigmas: np.ndarray
    settings: train_state.AdamSettings
    optimizer: object
    state: train_state.TrainState
    seed: int
    base_key: object
    data_path: str | None
    total_steps: int
    order: object


def _effective_config(config, n_iters):
    if n_iters is None:
        return config
    if n_iters < 1:
        raise UserError(f'--n_iters must be >= 1, got {n_iters}')
    return dataclasses.replace(config, training=dataclasses.replace(config.training,
                                                                    n_iters=n_iters))


def _data_path(args, config, saved_args) -> str | None:
    """Return the absolute path of the training data, or None for a built-in dataset.

    The order is --data, then (on --resume) the path the run recorded in args.yml, then
    data.path of the config. Relative paths start at the working folder.
    """
    if args.data is not None:
        path, origin = args.data, '--data'
    elif saved_args.get('data'):
        path, origin = saved_args['data'], f'args.yml of {args.resume}'
    elif config.data.path:
        path, origin = config.data.path, f'data.path of {config.source}'
    else:
        return None
    if not Path(path).exists():
        raise UserError(f'training data not found: {path} (from {origin}); check the path, which '
                        'is relative to the working folder unless absolute')
    return str(Path(path).resolve())


def prepare(args) -> tuple[RunSetup, Path | None]:
    """Load the config, data and initial state; return (setup, run folder to resume or None)."""
    from ncsn_jax.config import load_config, sigma_ladder
    from ncsn_jax.data import EpochOrder, load_dataset
    from ncsn_jax.models import check_image_size, create_model

    saved_args, resume_dir, resume_payload = {}, None, None
    if args.resume is not None:
        resume_dir, saved_args, resume_payload, config = _read_resume(args, load_config)
    else:
        if args.config is None:
            raise UserError('pass --config CONFIG to start a run, or --resume RUN_DIR')
        config = load_config(args.config)
    config = _effective_config(config, args.n_iters)

    reason = check_image_size(config.model.architecture, config.data.image_size)
    if reason:
        raise UserError(f'{config.source}: {reason}')
    settings = train_state.AdamSettings.from_config(config.optim)
    optimizer = train_state.make_optimizer(settings)
    module = create_model(config.model.architecture, config.model.ngf, config.data.channels)
    sigmas = sigma_ladder(config)

    n_devices = len(jax.local_devices())
    if config.training.batch_size % n_devices:
        raise UserError(f'training.batch_size {config.training.batch_size} is not divisible by '
                        f'the {n_devices} local devices; pick a multiple of {n_devices}')

    data_path = _data_path(args, config, saved_args)
    dataset = load_dataset(config.data, data_path)
    EpochOrder.check_sizes(dataset.count, config.training.batch_size)

    if resume_payload is not None:
        seed, base_key, state = _resumed_state(args, resume_dir, resume_payload, config,
                                               optimizer, dataset)
    else:
        seed, base_key, state = _new_state(args, config, module, sigmas, settings, optimizer)

    order = EpochOrder(jax.random.fold_in(base_key, DATA_STREAM), dataset.count,
                       config.training.batch_size)
    total = min(config.training.n_iters, config.training.n_epochs * order.steps_per_epoch)
    setup = RunSetup(config=config, dataset=dataset, module=module, sigmas=sigmas,
                     settings=settings, optimizer=optimizer, state=state, seed=seed,
                     base_key=base_key, data_path=data_path, total_steps=total, order=order)
    return setup, resume_dir


def _resumed_state(args, resume_dir, payload, config, optimizer, dataset):
    """Return (seed, base key, state) of a run continued with --resume."""
    metadata = payload['metadata']
    seed = int(metadata['seed'])
    if args.seed is not None and args.seed != seed:
        raise UserError(f'{resume_dir} was started with --seed {seed}; drop --seed or pass '
                        f'--seed {seed}')
    base_key = jax.random.wrap_key_data(np.asarray(payload['extra']['rng_key'], np.uint32))
    fingerprint = metadata.get('data', {}).get('fingerprint')
    if fingerprint and fingerprint != dataset.fingerprint():
        log.warning('the training data (%s) differ from those the run started with, so the '
                    'resumed run will not repeat a straight run', dataset.source)
    state = state_from_payload(payload, optimizer, ema=config.model.ema, source=resume_dir)
    return seed, base_key, state


def _new_state(args, config, module, sigmas, settings, optimizer):
    """Return (seed, base key, state) of a new run: fresh parameters or --init-from."""
    seed = DEFAULT_SEED if args.seed is None else args.seed
    base_key = jax.random.key(seed)
    if args.init_from is None:
        params = train_state.init_params(module, jax.random.fold_in(base_key, INIT_STREAM),
                                         config.data.image_size, config.data.channels)
        return seed, base_key, train_state.create_train_state(params, optimizer,
                                                              ema=config.model.ema)

    payload = read_init_checkpoint(args.init_from)
    check_model_matches(payload['metadata'], config, args.init_from)
    check_sigmas_match(payload['extra']['sigmas'], sigmas, args.init_from, config)
    warn_optimizer_differences(payload['metadata'].get('optimizer'), settings, args.init_from)
    state = state_from_payload(payload, optimizer, ema=config.model.ema, source=args.init_from)
    log.info('continuing from %s at step %d', args.init_from, int(state.step))
    return seed, base_key, state


def _read_resume(args, load_config):
    run_dir = Path(args.resume)
    if not run_dir.is_dir():
        raise UserError(f'run folder not found: {run_dir}')
    if args.init_from is not None:
        raise UserError('--init-from starts a new run, so it cannot be combined with --resume')
    config_path = run_dir / 'config.yml'
    if not config_path.is_file():
        raise UserError(f'{run_dir} is not a training run folder (no config.yml)')
    config = load_config(config_path)

    if args.config is not None:
        from ncsn_jax.config import config_to_dict
        given, own = config_to_dict(load_config(args.config)), config_to_dict(config)
        # training.n_iters may differ: --n_iters sets it and the run's config.yml records it.
        given['training'].pop('n_iters')
        own['training'].pop('n_iters')
        if given != own:
            raise UserError(f'--config {args.config} differs from the config of {run_dir}; drop '
                            '--config to resume with the run\'s own config.yml')

    saved_args = {}
    args_path = run_dir / 'args.yml'
    if args_path.is_file():
        saved_args = yaml.safe_load(args_path.read_text(encoding='utf-8')) or {}

    latest = run_dir / 'checkpoints' / 'checkpoint.msgpack'
    if not latest.is_file():
        raise UserError(f'{run_dir} has no checkpoint yet (checkpoints/checkpoint.msgpack); the '
                        'run stopped before its first snapshot, so start it again')
    payload = train_state.read_train_state_file(latest)
    if 'rng_key' not in payload['extra'] or 'seed' not in payload['metadata']:
        raise UserError(f'{latest} was not written by the trainer (no seed or PRNG key); start a '
                        f'new run with --init-from {latest}')
    check_model_matches(payload['metadata'], config, latest)
    return run_dir, saved_args, payload, config


def create_run_dir(exp_root, config_source) -> Path:
    """Create EXP/train_<config name>_<YYYYmmdd-HHMMSS>[_<n>], never reusing a folder."""
    exp_root = Path(exp_root)
    exp_root.mkdir(parents=True, exist_ok=True)
    stem = f'train_{Path(config_source).stem}_{time.strftime("%Y%m%d-%H%M%S")}'
    for attempt in range(1000):
        path = exp_root / (stem if attempt == 0 else f'{stem}_{attempt}')
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise UserError(f'could not create a new run folder under {exp_root}')


class Run:
    """A training run writing into `run_dir`: the loop, checkpoints, samples and the loss log."""

    def __init__(self, setup: RunSetup, run_dir: Path):
        self.setup = setup
        self.run_dir = run_dir
        self.checkpoint_dir = run_dir / 'checkpoints'
        self.checkpoint_dir.mkdir(exist_ok=True)
        self.log_path = run_dir / 'train_log.csv'
        config = setup.config
        self.mesh = local_mesh()
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec('data'))
        from ncsn_jax.data import Augmentation
        self.step_fn = compile_train_step(
            self.mesh, module=setup.module, optimizer=setup.optimizer,
            anneal_power=config.training.anneal_power, ema_rate=config.model.ema_rate,
            augmentation=Augmentation.from_config(config.data))
        self.step_key = jax.random.fold_in(setup.base_key, STEP_STREAM)
        self.sigmas = jax.device_put(jnp.asarray(setup.sigmas), self.replicated)

    # -- files ---------------------------------------------------------------------------------

    def _metadata(self, step: int) -> dict:
        setup, config = self.setup, self.setup.config
        epoch = max(step - 1, 0) // setup.order.steps_per_epoch
        next_epoch, next_batch = setup.order.position(step)
        return {
            'architecture': config.model.architecture, 'ngf': config.model.ngf,
            'channels': config.data.channels, 'image_size': config.data.image_size,
            'num_classes': int(setup.sigmas.shape[0]), 'sigma_begin': float(setup.sigmas[0]),
            'sigma_end': float(setup.sigmas[-1]), 'step': step, 'epoch': epoch,
            'optimizer': setup.settings.torch_param_group(), 'ema': config.model.ema,
            'ema_rate': config.model.ema_rate, 'seed': setup.seed,
            'data': {'source': setup.dataset.source, 'count': setup.dataset.count,
                     'fingerprint': setup.dataset.fingerprint(),
                     'steps_per_epoch': setup.order.steps_per_epoch,
                     'next_epoch': next_epoch, 'next_batch': next_batch},
            'trainer_version': TRAINER_VERSION,
        }

    def save_checkpoint(self, state):
        step = int(state.step)
        metadata = self._metadata(step)
        kwargs = dict(params=state.params, sigmas=self.setup.sigmas, metadata=metadata,
                      ema_params=state.ema_params,
                      adam=train_state.adam_state_to_tree(state.opt_state),
                      rng_key=jax.random.key_data(self.setup.base_key), overwrite=True)
        train_state.write_train_state_file(self.checkpoint_dir / f'checkpoint_{step}.msgpack',
                                           **kwargs)
        train_state.write_train_state_file(self.checkpoint_dir / 'checkpoint.msgpack', **kwargs)
        self.save_score_model(state, metadata)
        log.info('step %d: checkpoint written to %s', step,
                 self.checkpoint_dir / f'checkpoint_{step}.msgpack')

    def save_score_model(self, state, metadata):
        use_ema = state.ema_params is not None
        fields = ('architecture', 'ngf', 'channels', 'image_size', 'num_classes', 'sigma_begin',
                  'sigma_end', 'step', 'epoch')
        score_metadata = {key: metadata[key] for key in fields}
        score_metadata.update(ema=use_ema, source_name=self.run_dir.name)
        checkpoint.write_params_file(
            self.run_dir / 'score_model.msgpack', kind='score_model',
            params=train_state.to_numpy(state.ema_params if use_ema else state.params),
            metadata=score_metadata, extra={'sigmas': np.asarray(self.setup.sigmas, np.float32)},
            overwrite=True)

    def save_samples(self, state):
        from ncsn_jax import plots
        from ncsn_jax.sampling import pid_ald
        from ncsn_jax.score_model import ScoreModel

        config = self.setup.config
        sampling = config.sampling
        step = int(state.step)
        params = state.ema_params if state.ema_params is not None else state.params
        model = ScoreModel(module=self.setup.module, params=params,
                           sigmas=jnp.asarray(self.setup.sigmas))
        key = jax.random.fold_in(jax.random.fold_in(self.setup.base_key, SAMPLE_STREAM), step)
        init_key, noise_key = jax.random.split(key)
        shape = (SNAPSHOT_SAMPLE_COUNT, config.data.image_size, config.data.image_size,
                 config.data.channels)
        x, _ = pid_ald(model, jax.random.uniform(init_key, shape), self.setup.sigmas,
                       n_steps_each=sampling.n_steps_each, step_lr=sampling.step_lr,
                       k_p=sampling.k_p, k_i=sampling.k_i, k_d=sampling.k_d,
                       k_i_decay=sampling.k_i_decay, k_d_decay=sampling.k_d_decay,
                       denoise=sampling.denoise, key=noise_key)
        path = self.run_dir / 'samples' / f'image_grid_{step}.png'
        plots.save_image_grid(path, np.asarray(x), nrow=6, overwrite=True)
        log.info('step %d: snapshot samples written to %s', step, path)

    def _trim_log(self, last_step: int):
        """Keep the loss-log rows up to `last_step`: later ones were redone after a resume."""
        if not self.log_path.exists():
            return
        kept = ['step,loss']
        for line in self.log_path.read_text(encoding='utf-8').splitlines()[1:]:
            parts = line.split(',')
            if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) <= last_step:
                kept.append(line)
        atomic_write_text(self.log_path, '\n'.join(kept) + '\n', overwrite=True)

    # -- loop ----------------------------------------------------------------------------------

    def train(self) -> train_state.TrainState:
        setup, config = self.setup, self.setup.config
        state = jax.device_put(setup.state, self.replicated)
        start = int(state.step)
        total = setup.total_steps
        self._trim_log(start)
        if start >= total:
            log.info('the state is at step %d and the run ends at step %d; nothing to train',
                     start, total)
            if not (self.checkpoint_dir / 'checkpoint.msgpack').is_file():
                self.save_checkpoint(state)
            return state
        log.info('training steps %d to %d on %d device(s), batch %d, %d steps per epoch',
                 start + 1, total, len(self.mesh.devices.flat), config.training.batch_size,
                 setup.order.steps_per_epoch)

        new_log = not self.log_path.exists()
        started = time.perf_counter()
        recent = []
        with open(self.log_path, 'a', encoding='utf-8') as log_file, logging_redirect_tqdm(), \
                tqdm(total=total, initial=start, desc='training', unit='step') as progress:
            if new_log:
                log_file.write('step,loss\n')
            pending = None
            for step in range(start, total):
                batch = setup.dataset.batch(setup.order.indices(step))
                batch = jax.device_put(batch, self.batch_sharding)
                state, loss = self.step_fn(state, batch, self.step_key, self.sigmas)
                if pending is not None:
                    self._record(*pending, log_file, progress, recent)
                pending = (step + 1, loss)
                completed = step + 1
                if completed % config.training.snapshot_freq == 0 or completed == total:
                    self._record(*pending, log_file, progress, recent)
                    pending = None
                    log_file.flush()
                    self.save_checkpoint(state)
                    if config.training.snapshot_sampling:
                        self.save_samples(state)
        elapsed = time.perf_counter() - started
        log.info('trained %d steps in %.1f s (%.3f s per step)', total - start, elapsed,
                 elapsed / (total - start))
        return state

    def _record(self, step, loss, log_file, progress, recent):
        value = float(loss)
        if not np.isfinite(value):
            raise UserError(f'training diverged: the loss of step {step} is {value}; lower '
                            f'optim.lr or resume from the last checkpoint in {self.checkpoint_dir}')
        log_file.write(f'{step},{value!r}\n')
        progress.update(1)
        progress.set_postfix(loss=f'{value:.4g}')
        recent.append(value)
        if step % LOG_EVERY == 0:
            log.info('step %d: mean loss of the last %d steps %.5g', step, len(recent),
                     float(np.mean(recent)))
            recent.clear()


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog='python -m ncsn_jax.train',
        description='Train an NCSNv2 score model with denoising score matching (the official '
                    'NCSNv2 training loss and Adam).')
    parser.add_argument('--config', help='config file name in configs/ (e.g. digits.yml) or a path')
    parser.add_argument('--exp', default='exp', help='folder in which the run folder is created '
                        '(default: exp)')
    parser.add_argument('--resume', metavar='RUN_DIR', help='continue the run in RUN_DIR from its '
                        'latest checkpoint, with its own config.yml')
    parser.add_argument('--init-from', dest='init_from', metavar='CHECKPOINT',
                        help='start a new run from an official PyTorch checkpoint (.pth) or an '
                        'ncsn-jax train_state or score_model file (.msgpack)')
    parser.add_argument('--data', metavar='PATH', help='training images: a folder of PNG/JPEG '
                        'files or an .npz with an images array (NHWC). Overrides data.path. Not '
                        'needed for digits')
    parser.add_argument('--n_iters', type=int, help='total number of optimizer steps of the run '
                        '(overrides training.n_iters)')
    parser.add_argument('--seed', type=int, help=f'random seed of a new run (default '
                        f'{DEFAULT_SEED}); a resumed run keeps its own')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from ncsn_jax.experiment import add_log_file

    # Records logged while the run is prepared come before its folder exists, so they are
    # buffered here and written to the run's log once the folder is there.
    early = logging.handlers.BufferingHandler(capacity=10_000)
    logging.getLogger().addHandler(early)
    try:
        setup, run_dir = prepare(args)
    finally:
        logging.getLogger().removeHandler(early)
    if run_dir is None:
        run_dir = create_run_dir(args.exp, setup.config.source)
    handler = add_log_file(run_dir / 'stdout.txt')
    for record in early.buffer:
        handler.handle(record)
    try:
        _run(args, setup, run_dir, argv)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    return 0


def _run(args, setup, run_dir, argv):
    from ncsn_jax.config import config_to_dict

    command = shlex.join([sys.executable, '-m', 'ncsn_jax.train'] + list(
        sys.argv[1:] if argv is None else argv))
    log.info('run folder: %s', run_dir)
    log.info('command: %s', command)
    atomic_write_text(run_dir / 'config.yml',
                      yaml.safe_dump(config_to_dict(setup.config), sort_keys=False),
                      overwrite=True)
    saved = {'config': args.config, 'data': setup.data_path, 'seed': setup.seed,
             'init_from': args.init_from, 'command': command}
    if args.resume is None:
        atomic_write_text(run_dir / 'args.yml', yaml.safe_dump(saved, sort_keys=False))
    Run(setup, run_dir).train()
    log.info('done: %s', run_dir)


if __name__ == '__main__':
    setup_logging()
    sys.exit(run_main(main))
