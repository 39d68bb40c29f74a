"""A sampling run: the experiment folder, per-sample randomness, chunked drawing and outputs.

The only module that writes into an experiment folder. Layout of a finished run:

    EXP/experiment_<unix time>_<k_p>_<k_i>_<k_d>_<name>/
        stdout.txt, config.yml, args.yml
        image_samples/samples_final.npz        array `samples` (n_samples, H, W, C), float32
        image_samples/samples_step_<k>.npz     snapshots after global step k (sampling.last_only false)
        image_samples/grid_step_<k>.png        grids after global step k (visualization.last_only false)
        image_samples/grid_final.png
        sampler_record_dict.json, sampler_record.png
        metric_record_dict.json                FID/IS/KID per evaluation (evaluation.evaluate)

The final samples are evaluated as global step L·T (after the denoising step, if any).
"""

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from tqdm.auto import tqdm

from ncsn_jax import evaluation, plots
from ncsn_jax.config import Config, config_to_dict, sigma_ladder
from ncsn_jax.errors import UserError
from ncsn_jax.fileio import atomic_save_npz, atomic_write_json, atomic_write_text
from ncsn_jax.sampling import NORM_NAMES, pid_ald_per_sample, record_from_norm_sums, snapshot_slot_table

log = logging.getLogger(__name__)


class SamplingDiverged(UserError):
    """The sampler produced NaN or Inf."""


def format_gain(value: float) -> str:
    """Format a gain as Python prints a float (1.0, 0.5, 4.5), as the folder names use."""
    return repr(float(value))


def create_experiment_dir(exp_root, k_p, k_i, k_d, exp_name='default', suffix=None) -> Path:
    """Create a new folder `experiment_<unix time>_<k_p>_<k_i>_<k_d>[_<name or suffix>]`.

    The name part is `exp_name` when `suffix` is None, `suffix` when it is non-empty, and absent
    for an empty suffix. An existing folder is never reused: the time stamp moves on instead.
    """
    exp_root = Path(exp_root)
    exp_root.mkdir(parents=True, exist_ok=True)
    tail = exp_name if suffix is None else suffix
    stamp = int(time.time())
    while True:
        name = f'experiment_{stamp}_{format_gain(k_p)}_{format_gain(k_i)}_{format_gain(k_d)}'
        if tail:
            name += f'_{tail}'
        path = exp_root / name
        try:
            path.mkdir()
            return path
        except FileExistsError:
            stamp += 1


def add_log_file(path) -> logging.Handler:
    """Copy everything logged from now on into `path` as well."""
    handler = logging.FileHandler(path, encoding='utf-8')
    handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s'))
    logging.getLogger().addHandler(handler)
    return handler


def sample_keys(seed: int, indices):
    """Return (init_keys, noise_keys), one pair per sample, derived from the seed and its index.

    A sample's randomness depends on nothing else, so chunk size and device count cannot change it.
    """
    base = jax.random.key(seed)

    def pair(index):
        init_key, noise_key = jax.random.split(jax.random.fold_in(base, index))
        return init_key, noise_key

    return jax.vmap(pair)(jnp.asarray(indices, jnp.uint32))


def initial_samples(init_keys, shape):
    """Uniform noise in [0, 1), as the reference sampler starts."""
    return jax.vmap(lambda key: jax.random.uniform(key, shape, jnp.float32))(init_keys)


@dataclasses.dataclass
class RunPlan:
    """What a run draws and keeps, derived from the config."""

    n_samples: int
    batch_size: int
    total_steps: int
    snapshot_steps: tuple   # global steps whose samples are saved as .npz
    grid_steps: tuple       # global steps drawn as PNG grids
    eval_steps: tuple = ()  # global steps whose samples are evaluated (besides the final ones)

    @property
    def kept_steps(self) -> tuple:
        return tuple(sorted(set(self.snapshot_steps) | set(self.grid_steps) | set(self.eval_steps)))

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n_samples / self.batch_size)


def plan_run(config: Config) -> RunPlan:
    sampling, visualization = config.sampling, config.visualization
    total = config.model.num_classes * sampling.n_steps_each
    snapshot_steps = ()
    if sampling.save and not sampling.last_only:
        snapshot_steps = tuple(range(0, total, sampling.freq))
    grid_steps = ()
    if visualization.save and not visualization.last_only:
        grid_steps = tuple(range(0, total, visualization.freq))
    eval_steps = ()
    if config.evaluation.evaluate and not config.evaluation.last_only:
        eval_steps = tuple(range(0, total, config.evaluation.freq))
    n_samples = sampling.n_samples or sampling.batch_size
    return RunPlan(n_samples=n_samples, batch_size=min(sampling.batch_size, n_samples),
                   total_steps=total, snapshot_steps=snapshot_steps, grid_steps=grid_steps,
                   eval_steps=eval_steps)


def _first_nonfinite_step(image_norms: np.ndarray):
    bad = ~np.isfinite(image_norms).all(axis=1)
    return int(np.argmax(bad)) if bad.any() else None


def draw_samples(model, config: Config, seed: int, plan: RunPlan):
    """Draw all samples chunk by chunk. Yields (indices, samples, kept snapshots, norm sums).

    Each chunk is padded to `plan.batch_size` samples (the padding are the next sample indices),
    so every chunk runs the same compiled program; padded samples are dropped before yielding.
    """
    sampling = config.sampling
    sigmas = jnp.asarray(sigma_ladder(config))
    gains = jnp.asarray([sampling.k_p, sampling.k_i, sampling.k_d, sampling.k_i_decay,
                         sampling.k_d_decay], jnp.float32)
    slots = jnp.asarray(snapshot_slot_table(plan.kept_steps, plan.total_steps))
    shape = (config.data.image_size, config.data.image_size, config.data.channels)

    for chunk in range(plan.n_chunks):
        start = chunk * plan.batch_size
        indices = np.arange(start, start + plan.batch_size)
        valid = int(min(plan.batch_size, plan.n_samples - start))
        init_keys, noise_keys = sample_keys(seed, indices)
        x, snapshots, norms = pid_ald_per_sample(
            model, initial_samples(init_keys, shape), sigmas, jnp.float32(sampling.step_lr), gains,
            noise_keys, slots, n_steps_each=sampling.n_steps_each, denoise=sampling.denoise,
            noise_mode='per_sample_keys', n_snapshots=len(plan.kept_steps))
        norms = {name: np.asarray(value)[:, :valid] for name, value in norms.items()}
        bad_step = _first_nonfinite_step(norms['image_norms'])
        if bad_step is not None:
            level, step = divmod(bad_step, sampling.n_steps_each)
            raise SamplingDiverged(
                f'the sampler produced NaN or Inf at noise level {level} (sigma '
                f'{float(sigmas[level]):.4g}), step {step} of that level (global step {bad_step}) '
                f'in samples {start}-{start + valid - 1}; lower sampling.step_lr or the gains')
        x = np.asarray(x)[:valid]
        if not np.isfinite(x).all():
            raise SamplingDiverged('the final denoising step produced NaN or Inf in samples '
                                   f'{start}-{start + valid - 1}; lower sampling.step_lr or the gains')
        sums = {name: value.sum(axis=1, dtype=np.float64) for name, value in norms.items()}
        yield indices[:valid], x, np.asarray(snapshots)[:, :valid], sums


def write_run_settings(exp_dir: Path, config: Config, args: dict):
    atomic_write_text(exp_dir / 'config.yml', yaml.safe_dump(config_to_dict(config), sort_keys=False))
    atomic_write_text(exp_dir / 'args.yml', yaml.safe_dump(args, sort_keys=False))


def run_sampling(model, config: Config, exp_dir: Path, seed: int, evaluator=None) -> dict:
    """Draw `sampling.n_samples` samples into `exp_dir`; return the record and the metrics.

    With an `evaluation.Evaluator`, the Inception features of each chunk are computed as the
    chunk completes, so only features (n × 2048) are kept for the metrics, never all snapshots.
    """
    plan = plan_run(config)
    image_dir = exp_dir / 'image_samples'
    image_dir.mkdir()
    log.info('drawing %d samples in %d chunks of %d: %d noise levels x %d steps, gains k_p=%s '
             'k_i=%s k_d=%s', plan.n_samples, plan.n_chunks, plan.batch_size,
             config.model.num_classes, config.sampling.n_steps_each, config.sampling.k_p,
             config.sampling.k_i, config.sampling.k_d)

    grid_count = config.visualization.nrow ** 2
    samples, kept = [], []
    eval_slots = [plan.kept_steps.index(step) for step in plan.eval_steps]
    features = {step: ([], []) for step in plan.eval_steps + (plan.total_steps,)}
    norm_sums = {name: np.zeros(plan.total_steps, np.float64) for name in NORM_NAMES}
    started = time.perf_counter()
    with tqdm(total=plan.n_samples, unit='sample', desc='sampling') as progress:
        for indices, x, snapshots, sums in draw_samples(model, config, seed, plan):
            samples.append(x)
            kept.append(snapshots)
            for name in NORM_NAMES:
                norm_sums[name] += sums[name]
            if evaluator is not None:
                batches = [(step, snapshots[slot]) for step, slot in zip(plan.eval_steps, eval_slots)]
                for step, images in batches + [(plan.total_steps, x)]:
                    pool, logits = evaluator.features(images)
                    features[step][0].append(pool)
                    features[step][1].append(logits)
            progress.update(len(indices))
    log.info('sampling took %.1f s', time.perf_counter() - started)

    samples = np.concatenate(samples)
    kept = np.concatenate(kept, axis=1) if plan.kept_steps else None
    atomic_save_npz(image_dir / 'samples_final.npz', samples=samples.astype(np.float32))
    if config.sampling.save:
        for slot, step in enumerate(plan.kept_steps):
            if step in plan.snapshot_steps:
                atomic_save_npz(image_dir / f'samples_step_{step}.npz', samples=kept[slot])
    if config.visualization.save:
        for slot, step in enumerate(plan.kept_steps):
            if step in plan.grid_steps:
                plots.save_image_grid(image_dir / f'grid_step_{step}.png', kept[slot][:grid_count],
                                      nrow=config.visualization.nrow)
    plots.save_image_grid(image_dir / 'grid_final.png', samples[:grid_count],
                          nrow=config.visualization.nrow)

    record = record_from_norm_sums(norm_sums, plan.n_samples)
    atomic_write_json(exp_dir / 'sampler_record_dict.json',
                      {name: [float(v) for v in values] for name, values in record.items()})
    plots.plot_record(exp_dir / 'sampler_record.png', record, config.sampling.n_steps_each)
    log.info('final samples: %s', image_dir / 'samples_final.npz')

    metric_record = None
    if evaluator is not None:
        metric_record = evaluation.empty_metric_record()
        for step, (pools, logits) in sorted(features.items()):
            metrics = evaluator.metrics(np.concatenate(pools), np.concatenate(logits))
            evaluation.log_metrics(step, metrics)
            evaluation.append_metrics(metric_record, step, metrics)
        atomic_write_json(exp_dir / 'metric_record_dict.json', metric_record)
    return {'record': record, 'samples': samples, 'metrics': metric_record}
