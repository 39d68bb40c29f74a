"""A sampling run: the experiment folder, per-sample randomness, chunked drawing and outputs.

The only module that writes into an experiment folder. Layout of a finished run:

    EXP/experiment_<unix time>_<k_p>_<k_i>_<k_d>_<name>/
        stdout.txt, config.yml, args.yml
        stdout_process_<i>.txt                 log of process i > 0 (multi-host runs)
        image_samples/samples_final.npz        array `samples` (n_samples, H, W, C), float32
        image_samples/samples_step_<k>.npz     snapshots after global step k (sampling.last_only false)
        image_samples/grid_step_<k>.png        grids after global step k (visualization.last_only false)
        image_samples/grid_final.png
        sampler_record_dict.json, sampler_record.png
        metric_record_dict.json                FID/IS/KID per evaluation (evaluation.evaluate)
        run_complete.json                      written last; its presence marks a finished run
        chunks/chunk_<c>.npz                   finished chunks (see ncsn_jax/chunks.py); removed
                                               when the run finishes unless --keep_chunks is given

The final samples are evaluated as global step L·T (after the denoising step, if any).

Drawing and writing outputs are separate phases. Every process draws its share of the chunks and
saves each one to `chunks/` as it completes. Process 0 then reads all chunk files in index order
and streams them into the outputs. Neither phase keeps more than one chunk of images in memory,
and a resumed run (`--resume`) ends with the same outputs as an uninterrupted one.
"""

import dataclasses
import functools
import logging
import math
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from tqdm.auto import tqdm

from ncsn_jax import distributed, evaluation, plots
from ncsn_jax.chunks import (CHUNK_DIR_NAME, CHUNK_FORMAT_VERSION, InvalidChunk, NpzArrayWriter,
                             chunk_path, load_chunk, save_chunk)
from ncsn_jax.config import Config, config_to_dict, load_config, sigma_ladder
from ncsn_jax.distributed import ProcessGroup
from ncsn_jax.errors import UserError
from ncsn_jax.fileio import atomic_write_json, atomic_write_text
from ncsn_jax.sampling import NORM_NAMES, pid_ald_per_sample, record_from_norm_sums, snapshot_slot_table

log = logging.getLogger(__name__)

COMPLETE_MARKER = 'run_complete.json'
RUN_SETTINGS_FILES = ('args.yml', 'config.yml')

# How often process 0 checks for the chunk files of the other processes.
GATHER_POLL_SECONDS = 0.5


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
    """Copy everything logged from now on into `path` as well (appending to an existing file)."""
    handler = logging.FileHandler(path, encoding='utf-8')
    handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s'))
    logging.getLogger().addHandler(handler)
    return handler


def log_file_name(group: ProcessGroup) -> str:
    return 'stdout.txt' if group.is_main else f'stdout_process_{group.index}.txt'


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
    """The samples, snapshots, grids and evaluations of a run, derived from the config."""

    n_samples: int
    batch_size: int
    total_steps: int
    snapshot_steps: tuple   # global steps whose samples are saved as .npz
    grid_steps: tuple       # global steps drawn as PNG grids
    eval_steps: tuple = ()  # global steps whose samples are evaluated (besides the final ones)
    grid_count: int = 0     # samples shown in a grid (nrow²)

    @property
    def kept_steps(self) -> tuple:
        return tuple(sorted(set(self.snapshot_steps) | set(self.grid_steps) | set(self.eval_steps)))

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n_samples / self.batch_size)

    def chunk_bounds(self, chunk: int) -> tuple:
        """Return (first sample index, sample count) of a chunk."""
        start = chunk * self.batch_size
        return start, min(self.batch_size, self.n_samples - start)


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
                   eval_steps=eval_steps, grid_count=visualization.nrow ** 2)


def feature_steps(plan: RunPlan, evaluator) -> tuple:
    """Return the global steps whose Inception features are computed (L·T: the final samples)."""
    if evaluator is None:
        return ()
    return plan.eval_steps + (plan.total_steps,)


def chunk_meta(plan: RunPlan, seed: int, chunk: int, evaluator) -> dict:
    """Return the meta that a chunk file must contain to be used by this run."""
    start, count = plan.chunk_bounds(chunk)
    return {'format': CHUNK_FORMAT_VERSION, 'chunk': chunk, 'first_index': start, 'count': count,
            'seed': seed, 'n_samples': plan.n_samples, 'batch_size': plan.batch_size,
            'total_steps': plan.total_steps, 'snapshot_steps': list(plan.snapshot_steps),
            'grid_steps': list(plan.grid_steps), 'grid_count': plan.grid_count,
            'feature_steps': list(feature_steps(plan, evaluator))}


def _first_nonfinite_step(image_norms: np.ndarray):
    bad = ~np.isfinite(image_norms).all(axis=1)
    return int(np.argmax(bad)) if bad.any() else None


class ChunkSampler:
    """Sampler of one chunk at a time, spread over the local devices.

    The batch axis of the initial samples and of the per-sample keys is sharded over a 1-D mesh
    of `jax.local_devices()`, and the model parameters are replicated. A chunk is padded to a
    multiple of the device count with the next sample indices, and the padded samples are
    dropped from every result. The program is compiled on the first call.
    """

    def __init__(self, model, config: Config, plan: RunPlan, seed: int, evaluator=None):
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        self.config, self.plan, self.seed, self.evaluator = config, plan, seed, evaluator
        sampling = config.sampling
        self.image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
        mesh = distributed.local_mesh()
        self.n_devices = mesh.size
        self.padded_batch = distributed.padded_size(plan.batch_size, self.n_devices)
        replicated = NamedSharding(mesh, P())
        self.batch_sharding = NamedSharding(mesh, P(distributed.BATCH_AXIS))
        stacked = NamedSharding(mesh, P(None, distributed.BATCH_AXIS))

        self.model = jax.device_put(model, replicated)
        self.sigmas = jnp.asarray(sigma_ladder(config))
        self.step_lr = np.float32(sampling.step_lr)
        self.gains = np.asarray([sampling.k_p, sampling.k_i, sampling.k_d, sampling.k_i_decay,
                                 sampling.k_d_decay], np.float32)
        self.slots = snapshot_slot_table(plan.kept_steps, plan.total_steps)
        sampler = functools.partial(
            pid_ald_per_sample, n_steps_each=sampling.n_steps_each, denoise=sampling.denoise,
            noise_mode='per_sample_keys', n_snapshots=len(plan.kept_steps))
        # Arguments: model, x_init, sigmas, step_lr, gains, noise keys, snapshot slots.
        # Outputs: x (N, ...), snapshots (S, N, ...), norms {name: (L·T, N)}.
        self._sample = jax.jit(
            sampler,
            in_shardings=(replicated, self.batch_sharding, replicated, replicated, replicated,
                          self.batch_sharding, replicated),
            out_shardings=(self.batch_sharding, stacked, stacked))

    def draw(self, chunk: int) -> dict:
        """Draw a chunk and return the arrays of its chunk file (see ncsn_jax/chunks.py)."""
        plan, sampling = self.plan, self.config.sampling
        start, count = plan.chunk_bounds(chunk)
        indices = np.arange(start, start + self.padded_batch)
        init_keys, noise_keys = sample_keys(self.seed, indices)
        x_init = jax.device_put(initial_samples(init_keys, self.image_shape), self.batch_sharding)
        noise_keys = jax.device_put(noise_keys, self.batch_sharding)
        x, kept, norms = self._sample(self.model, x_init, self.sigmas, self.step_lr, self.gains,
                                      noise_keys, self.slots)

        norms = {name: np.asarray(value)[:, :count] for name, value in norms.items()}
        last = start + count - 1
        bad_step = _first_nonfinite_step(norms['image_norms'])
        if bad_step is not None:
            level, step = divmod(bad_step, sampling.n_steps_each)
            raise SamplingDiverged(
                f'the sampler produced NaN or Inf at noise level {level} (sigma '
                f'{float(self.sigmas[level]):.4g}), step {step} of that level (global step '
                f'{bad_step}) in samples {start}-{last}; lower sampling.step_lr or the gains')
        x = np.asarray(x)[:count]
        if not np.isfinite(x).all():
            raise SamplingDiverged('the final denoising step produced NaN or Inf in samples '
                                   f'{start}-{last}; lower sampling.step_lr or the gains')

        kept = np.asarray(kept)[:, :count]
        slot_of = {step: slot for slot, step in enumerate(plan.kept_steps)}
        in_grid = min(max(plan.grid_count - start, 0), count)
        empty = np.zeros((0, count) + self.image_shape, np.float32)
        arrays = {
            'indices': indices[:count].astype(np.int64),
            'samples': x,
            'snapshots': (kept[[slot_of[s] for s in plan.snapshot_steps]]
                          if plan.snapshot_steps else empty),
            'grid_snapshots': (kept[[slot_of[s] for s in plan.grid_steps], :in_grid]
                               if plan.grid_steps else empty[:, :in_grid]),
            'norm_sums': np.stack([norms[name].sum(axis=1, dtype=np.float64)
                                   for name in NORM_NAMES]),
        }
        for step in feature_steps(plan, self.evaluator):
            images = x if step == plan.total_steps else kept[slot_of[step]]
            arrays[f'pool_{step}'], arrays[f'logits_{step}'] = self.evaluator.features(images)
        return arrays


def write_run_settings(exp_dir: Path, config: Config, args: dict):
    atomic_write_text(exp_dir / 'config.yml', yaml.safe_dump(config_to_dict(config), sort_keys=False))
    atomic_write_text(exp_dir / 'args.yml', yaml.safe_dump(args, sort_keys=False))


def read_run_settings(exp_dir) -> tuple:
    """Return (effective config, saved arguments) of an experiment folder, for --resume.

    Raises UserError when the folder is missing or is not an experiment folder.
    """
    exp_dir = Path(exp_dir)
    if not exp_dir.is_dir():
        raise UserError(f'--resume {exp_dir}: folder not found; pass the folder of a run that '
                        'main.py started, such as exp/experiment_<time>_<k_p>_<k_i>_<k_d>_default')
    missing = [name for name in RUN_SETTINGS_FILES if not (exp_dir / name).is_file()]
    if missing:
        raise UserError(f'--resume {exp_dir}: not an experiment folder ({" and ".join(missing)} '
                        'missing); pass the folder of a run that main.py started')
    args_path = exp_dir / 'args.yml'
    try:
        args = yaml.safe_load(args_path.read_text(encoding='utf-8'))
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f'{args_path}: failed to read the saved arguments ({exc})') from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, 'problem_mark', None)
        where = f' at line {mark.line + 1}' if mark is not None else ''
        problem = getattr(exc, 'problem', None) or type(exc).__name__
        raise UserError(f'{args_path}: failed to read the saved arguments (invalid YAML{where}: '
                        f'{problem})') from None
    if not isinstance(args, dict) or isinstance(args.get('seed'), bool) or \
            not isinstance(args.get('seed'), int):
        raise UserError(f'{args_path}: invalid saved arguments, expected a mapping with an '
                        'integer seed')
    return load_config(exp_dir / 'config.yml'), args


def is_complete(exp_dir) -> bool:
    return (Path(exp_dir) / COMPLETE_MARKER).is_file()


def find_chunks_to_draw(chunk_dir: Path, plan: RunPlan, seed: int, evaluator) -> np.ndarray:
    """Return a boolean mask over the chunks: True where no valid chunk file exists.

    A file that fails verification is reported with a warning and drawn again. Temporary files
    left by a killed run are deleted.
    """
    for stale in sorted(chunk_dir.glob('.chunk_*.tmp')):
        log.info('deleting %s, left by an interrupted write', stale)
        stale.unlink()
    mask = np.ones(plan.n_chunks, bool)
    for chunk in range(plan.n_chunks):
        path = chunk_path(chunk_dir, chunk)
        if not path.exists():
            continue
        try:
            load_chunk(path, chunk_meta(plan, seed, chunk, evaluator))
        except InvalidChunk as exc:
            log.warning('chunk file %s is invalid (%s); drawing the chunk again', path, exc)
            continue
        mask[chunk] = False
    return mask


def draw_chunks(sampler: ChunkSampler, chunks, chunk_dir: Path, seed: int):
    """Draw the given chunks and save each one to `chunk_dir` as it completes."""
    plan = sampler.plan
    total = sum(plan.chunk_bounds(chunk)[1] for chunk in chunks)
    started = time.perf_counter()
    with tqdm(total=total, unit='sample', desc='sampling') as progress:
        for chunk in chunks:
            arrays = sampler.draw(chunk)
            save_chunk(chunk_path(chunk_dir, chunk),
                       chunk_meta(plan, seed, chunk, sampler.evaluator), arrays)
            progress.update(arrays['indices'].shape[0])
    if chunks:
        log.info('drawing %d chunks (%d samples) took %.1f s', len(chunks), total,
                 time.perf_counter() - started)


def wait_for_chunk_files(paths, timeout: float, poll: float = GATHER_POLL_SECONDS):
    """Block until every path exists, or raise UserError after `timeout` seconds."""
    missing = [Path(p) for p in paths if not Path(p).exists()]
    if not missing:
        return
    log.info('waiting for %d chunk files from the other processes', len(missing))
    deadline = time.monotonic() + timeout
    while missing:
        if time.monotonic() >= deadline:
            raise UserError(
                f'timed out after {timeout:g} s waiting for {len(missing)} chunk files from the '
                f'other processes, such as {missing[0]}; check that every process is running and '
                'that the experiment folder is on a file system shared by all hosts, then resume '
                'with --resume EXPERIMENT_DIR')
        time.sleep(poll)
        missing = [p for p in missing if not p.exists()]


def run_sampling(model, config: Config, exp_dir: Path, seed: int, evaluator=None, *,
                 group: ProcessGroup = ProcessGroup(), gather_timeout: float = 900.0,
                 keep_chunks: bool = False):
    """Draw `sampling.n_samples` samples into `exp_dir`, continuing from its chunk files.

    Every process draws its share of the chunks that have no valid chunk file. Process 0 then
    waits for the others' files, writes the outputs and returns {'record', 'metrics'}; the other
    processes return None. With an `evaluation.Evaluator`, each chunk's Inception features are
    stored in its chunk file, so only features (n × 2048) are kept for the metrics.
    """
    plan = plan_run(config)
    chunk_dir = exp_dir / CHUNK_DIR_NAME
    if group.is_main:
        chunk_dir.mkdir(exist_ok=True)
        to_draw = find_chunks_to_draw(chunk_dir, plan, seed, evaluator)
    else:
        to_draw = np.ones(plan.n_chunks, bool)
    to_draw = distributed.broadcast_mask(group, to_draw)
    chunk_dir.mkdir(exist_ok=True)
    todo = [int(chunk) for chunk in np.flatnonzero(to_draw)]
    mine = group.share(todo)

    sampler = ChunkSampler(model, config, plan, seed, evaluator)
    log.info('%d samples in %d chunks of %d, %d chunks left to draw, %d of them by this '
             'process on %d devices (padded chunk %d): %d noise levels x %d steps, gains k_p=%s '
             'k_i=%s k_d=%s', plan.n_samples, plan.n_chunks, plan.batch_size, len(todo),
             len(mine), sampler.n_devices, sampler.padded_batch, config.model.num_classes,
             config.sampling.n_steps_each, config.sampling.k_p, config.sampling.k_i,
             config.sampling.k_d)
    draw_chunks(sampler, mine, chunk_dir, seed)

    if not group.is_main:
        log.info('this process drew its chunks; process 0 writes the outputs')
        distributed.leave(group)
        return None
    others = sorted(set(todo) - set(mine))
    wait_for_chunk_files([chunk_path(chunk_dir, chunk) for chunk in others], gather_timeout)
    distributed.leave(group)
    return write_outputs(sampler, exp_dir, keep_chunks=keep_chunks)


def _read_or_redraw(sampler: ChunkSampler, chunk_dir: Path, chunk: int) -> dict:
    path = chunk_path(chunk_dir, chunk)
    meta = chunk_meta(sampler.plan, sampler.seed, chunk, sampler.evaluator)
    try:
        return load_chunk(path, meta)
    except InvalidChunk as exc:
        log.warning('chunk file %s is invalid (%s); drawing the chunk again', path, exc)
    arrays = sampler.draw(chunk)
    save_chunk(path, meta, arrays)
    return arrays


def write_outputs(sampler: ChunkSampler, exp_dir: Path, *, keep_chunks: bool = False) -> dict:
    """Assemble the outputs from the chunk files (in index order) and mark the run complete.

    Samples and snapshots are streamed into their .npz files one chunk at a time. Record sums are
    added in chunk order, so the record does not depend on which process drew which chunk or
    whether the run was resumed. Existing outputs of an interrupted earlier attempt are replaced.
    """
    config, plan, evaluator = sampler.config, sampler.plan, sampler.evaluator
    chunk_dir = exp_dir / CHUNK_DIR_NAME
    image_dir = exp_dir / 'image_samples'
    image_dir.mkdir(exist_ok=True)
    for stale in sorted(image_dir.glob('.samples_*.tmp')):
        log.info('deleting %s, left by an interrupted write', stale)
        stale.unlink()
    shape = sampler.image_shape

    norm_sums = np.zeros((len(NORM_NAMES), plan.total_steps), np.float64)
    features = {step: ([], []) for step in feature_steps(plan, evaluator)}
    grid_final = []
    grid_snapshots = []
    array_shape = (plan.n_samples,) + shape
    writers = [NpzArrayWriter(image_dir / 'samples_final.npz', 'samples', array_shape)]
    try:
        for step in plan.snapshot_steps:
            writers.append(NpzArrayWriter(image_dir / f'samples_step_{step}.npz', 'samples',
                                          array_shape))
        for chunk in range(plan.n_chunks):
            arrays = _read_or_redraw(sampler, chunk_dir, chunk)
            writers[0].write(arrays['samples'])
            for writer, snapshot in zip(writers[1:], arrays['snapshots']):
                writer.write(snapshot)
            norm_sums += arrays['norm_sums']
            start, _ = plan.chunk_bounds(chunk)
            if start < plan.grid_count:
                grid_final.append(arrays['samples'][:plan.grid_count - start])
                grid_snapshots.append(arrays['grid_snapshots'])
            for step, (pools, logits) in features.items():
                pools.append(arrays[f'pool_{step}'])
                logits.append(arrays[f'logits_{step}'])
        for writer in writers:
            writer.close()
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    log.info('final samples: %s', image_dir / 'samples_final.npz')

    nrow = config.visualization.nrow
    if plan.grid_steps:
        grid_snapshots = np.concatenate(grid_snapshots, axis=1)
        for slot, step in enumerate(plan.grid_steps):
            plots.save_image_grid(image_dir / f'grid_step_{step}.png', grid_snapshots[slot],
                                  nrow=nrow, overwrite=True)
    plots.save_image_grid(image_dir / 'grid_final.png', np.concatenate(grid_final), nrow=nrow,
                          overwrite=True)

    record = record_from_norm_sums(dict(zip(NORM_NAMES, norm_sums)), plan.n_samples)
    atomic_write_json(exp_dir / 'sampler_record_dict.json',
                      {name: [float(v) for v in values] for name, values in record.items()},
                      overwrite=True)
    plots.plot_record(exp_dir / 'sampler_record.png', record, config.sampling.n_steps_each,
                      overwrite=True)

    metric_record = None
    if evaluator is not None:
        metric_record = evaluation.empty_metric_record()
        for step, (pools, logits) in sorted(features.items()):
            metrics = evaluator.metrics(np.concatenate(pools), np.concatenate(logits))
            evaluation.log_metrics(step, metrics)
            evaluation.append_metrics(metric_record, step, metrics)
        atomic_write_json(exp_dir / 'metric_record_dict.json', metric_record, overwrite=True)

    atomic_write_json(exp_dir / COMPLETE_MARKER,
                      {'n_samples': plan.n_samples, 'n_chunks': plan.n_chunks,
                       'finished_unix_time': time.time()}, overwrite=True)
    if not keep_chunks:
        shutil.rmtree(chunk_dir)
    return {'record': record, 'metrics': metric_record}
