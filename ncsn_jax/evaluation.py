"""FID, Inception Score and KID of the samples of a run, against a statistics file."""

import logging
import math
from pathlib import Path

import numpy as np

from ncsn_jax import fid
from ncsn_jax.errors import UserError

log = logging.getLogger(__name__)

# Below this many samples FID is noticeably biased upward.
FID_RELIABLE_SAMPLES = 10_000


class Evaluator:
    """Inception network and reference statistics, loaded before sampling starts."""

    def __init__(self, evaluation_config, config_source: str):
        params_path = evaluation_config.inception_params_path
        stats_path = evaluation_config.inception_stats_path
        skip = 'or set evaluation.evaluate: false to skip evaluation'
        if not params_path or not Path(params_path).is_file():
            raise UserError(
                f'Inception parameter file {params_path} (evaluation.inception_params_path in '
                f'{config_source}) not found; convert pytorch-fid\'s weights with python '
                f'convert/torch_to_flax.py pt_inception-2015-12-05-6726825d.pth --out '
                f'{params_path or "INCEPTION.msgpack"}, {skip}')
        if not stats_path or not Path(stats_path).is_file():
            raise UserError(
                f'FID statistics file {stats_path} (evaluation.inception_stats_path in '
                f'{config_source}) not found; create it with python -m ncsn_jax.fid_stats '
                f'IMAGES --out {stats_path or "STATS.npz"} --inception {params_path}, {skip}')
        self.inception = fid.load_inception(params_path, batch_size=evaluation_config.batch_size)
        self.mu, self.sigma = fid.load_stats(stats_path)
        if self.mu.shape[0] != 2048:
            raise UserError(f'{stats_path} contains {self.mu.shape[0]}-d statistics; FID needs the '
                            '2048-d pool features of the FID Inception')
        self.reference_features = fid.load_reference_features(stats_path)
        if self.reference_features is None:
            log.info('%s contains no reference features, so KID is not computed (create the file '
                     'with python -m ncsn_jax.fid_stats to include them)', stats_path)

    def features(self, images):
        """Return (pool, logits) of images (N, H, W, C) in [0, 1]; values outside are clipped."""
        return self.inception(np.clip(np.asarray(images, np.float32), 0.0, 1.0))

    def metrics(self, pool, logits) -> dict:
        """FID, IS and (when reference features exist) KID of features of all samples."""
        count = pool.shape[0]
        mu, sigma = fid.compute_statistics(pool)
        result = {'fid': fid.frechet_distance(mu, sigma, self.mu, self.sigma)}
        splits = 10 if count >= 10 else 1
        result['is_mean'], result['is_std'] = fid.inception_score(logits, splits=splits)
        result['kid_mean'] = result['kid_std'] = None
        if self.reference_features is not None and count >= 2:
            result['kid_mean'], result['kid_std'] = fid.kernel_inception_distance(
                pool, self.reference_features)
        result['n_samples'] = count
        return {k: (float(v) if isinstance(v, (float, np.floating)) else v)
                for k, v in result.items()}


def log_metrics(step, metrics: dict):
    note = ''
    if metrics['n_samples'] < FID_RELIABLE_SAMPLES:
        note = (f' (FID from fewer than {FID_RELIABLE_SAMPLES} samples is biased upward; '
                'compare only runs with the same N)')
    kid = ''
    if metrics['kid_mean'] is not None:
        kid = f', KID {metrics["kid_mean"]:.5f} ± {metrics["kid_std"]:.5f}'
    log.info('step %s: FID %.3f with N = %d%s, IS %.3f ± %.3f%s', step, metrics['fid'],
             metrics['n_samples'], note, metrics['is_mean'], metrics['is_std'], kid)


def empty_metric_record() -> dict:
    return {'steps': [], 'fids': [], 'is_means': [], 'is_stds': [], 'kid_means': [],
            'kid_stds': [], 'n_samples': []}


def append_metrics(record: dict, step, metrics: dict):
    record['steps'].append(step)
    record['fids'].append(metrics['fid'])
    record['is_means'].append(metrics['is_mean'])
    record['is_stds'].append(metrics['is_std'])
    record['kid_means'].append(metrics['kid_mean'])
    record['kid_stds'].append(metrics['kid_std'])
    record['n_samples'].append(metrics['n_samples'])


def finite_or_none(value):
    return value if value is None or math.isfinite(value) else None
