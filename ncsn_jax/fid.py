"""FID, Inception Score and KID with the FID Inception network in JAX.

`load_inception` reads a converted `kind='inception'` parameter file (made by
convert/torch_to_flax.py from pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`) and returns a
callable that maps images in [0, 1] to 2048-d pool features and 1008 logits. The metric functions
work on NumPy arrays in float64 and follow pytorch-fid 0.3.0 (Fréchet distance), the Inception
Score of Salimans et al. (2016) as the PIDLD evaluation computes it, and the Kernel Inception
Distance of Bińkowski et al. (2018).
"""

import logging
import math
import warnings
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg, special

from ncsn_jax import inception as inception_net
from ncsn_jax.checkpoint import read_params_file
from ncsn_jax.errors import UserError
from ncsn_jax.fileio import atomic_save_npz

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 50


class InceptionFeatures:
    """The FID Inception network with its weights on the default JAX device.

    Call it with images (N, H, W, C) in [0, 1], C 1 or 3, to get NumPy float32 arrays
    `pool` (N, 2048) and `logits` (N, 1008). Every call runs batches of exactly `batch_size`
    images: the last partial batch is padded with zeros and the padded rows are dropped, so one
    compilation per image size serves all batches. One-channel images are repeated to three
    channels before they reach the device, so they share the compilation of RGB images.
    """

    def __init__(self, variables, *, batch_size: int = DEFAULT_BATCH_SIZE,
                 precision='highest', metadata: dict | None = None,
                 source: str = 'the Inception variables'):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f'batch_size must be a positive integer, got {batch_size!r}')
        inception_net.check_inception_variables(variables, source=source)
        self.batch_size = batch_size
        self.precision = precision
        self.metadata = dict(metadata or {})
        self.variables = jax.device_put(variables)
        self._forward = jax.jit(
            lambda variables, images: inception_net.apply_inception(variables, images, precision))

    def __call__(self, images):
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError('expected images of shape (N, H, W, C) with C 1 or 3, got '
                             f'{images.shape}')
        if not np.issubdtype(images.dtype, np.floating):
            raise ValueError(f'expected floating-point images in [0, 1], got dtype {images.dtype}; '
                             'divide uint8 images by 255')
        count = images.shape[0]
        if count == 0:
            return (np.zeros((0, inception_net.POOL_FEATURES), np.float32),
                    np.zeros((0, inception_net.NUM_CLASSES), np.float32))
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        images = images.astype(np.float32, copy=False)

        # All batches are dispatched before any result is read back, so JAX's asynchronous
        # dispatch can queue them.
        outputs = []
        for start in range(0, count, self.batch_size):
            batch = images[start:start + self.batch_size]
            if batch.shape[0] < self.batch_size:
                padding = np.zeros((self.batch_size - batch.shape[0], *batch.shape[1:]), np.float32)
                batch = np.concatenate([batch, padding])
            outputs.append(self._forward(self.variables, jnp.asarray(batch)))
        pool = np.concatenate([np.asarray(batch_pool) for batch_pool, _ in outputs])
        logits = np.concatenate([np.asarray(batch_logits) for _, batch_logits in outputs])
        return pool[:count], logits[:count]


def load_inception(path, batch_size: int = DEFAULT_BATCH_SIZE,
                   precision='highest') -> InceptionFeatures:
    """Load a converted FID Inception file and return the network as an `InceptionFeatures`.

    `precision` is passed to every convolution and to `fc`. The default 'highest' keeps float32
    accuracy on GPUs, whose default would use TF32; None follows jax.default_matmul_precision.
    Raises UserError for a missing or wrong file.
    """
    payload = read_params_file(path, kind='inception')
    metadata = payload['metadata']
    architecture = metadata.get('architecture', inception_net.ARCHITECTURE)
    if architecture != inception_net.ARCHITECTURE:
        raise UserError(f'{path} contains a {architecture!r} network, expected '
                        f'{inception_net.ARCHITECTURE!r}; convert pytorch-fid\'s '
                        'pt_inception-2015-12-05-6726825d.pth with convert/torch_to_flax.py')
    return InceptionFeatures(payload['params'], batch_size=batch_size, precision=precision,
                             metadata=metadata, source=str(path))


# ---------------------------------------------------------------------------------------------
# Metrics


def compute_statistics(features):
    """Return the float64 mean (D,) and covariance (D, D) of `features` (N, D), as pytorch-fid."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f'expected features of shape (N, D), got {features.shape}')
    count, dim = features.shape
    if count < 2:
        raise ValueError(f'a covariance needs at least 2 samples, got {count}')
    if count <= dim:
        log.warning('%d samples of %d features give a singular covariance, so the FID is '
                    'unreliable; use more samples than features (published FIDs use 50,000)',
                    count, dim)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Return the Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), as pytorch-fid 0.3.0.

    d² = |mu1 - mu2|² + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 sigma2)). When the matrix
    square root is not finite (a singular product), eps is added to the diagonal of both
    covariances and it is computed again. A complex square root is accepted when the imaginary
    parts of its diagonal are within 1e-3 of zero, and its real part is used. Otherwise this
    raises ValueError naming the largest imaginary component.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f'mean vectors have different or invalid shapes: {mu1.shape}, {mu2.shape}')
    dim = mu1.shape[0]
    if sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(f'covariances must be ({dim}, {dim}), got {sigma1.shape} and '
                         f'{sigma2.shape}')

    diff = mu1 - mu2
    # pytorch-fid passes disp=False, which keeps SciPy quiet about a singular product. SciPy 1.16
    # deprecates disp and warns instead, so the warning is silenced here to match.
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        log.warning('the product of the covariances is singular, so its square root is not '
                    'finite; adding %g to their diagonals', eps)
        offset = np.eye(dim) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))

    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            largest = np.max(np.abs(covmean.imag))
            raise ValueError(f'the square root of the covariance product has a significant '
                             f'imaginary component (largest {largest:.6g}); the covariances may '
                             'not be positive semi-definite')
        covmean = covmean.real

    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score(logits, splits: int = 10):
    """Return the Inception Score (mean, std) of `logits` (N, 1008) over `splits` splits.

    p(y|x) is the softmax over all logits. The samples are cut into `splits` consecutive parts of
    N // splits each; each part scores exp(mean over its samples of KL(p(y|x) || p(y))), with p(y)
    the mean of p(y|x) over the part. The result is the mean and the population standard
    deviation (np.std) of the part scores. When N is not a multiple of `splits`, the last
    N % splits samples are left out, as in the reference evaluation, and a warning is logged.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2:
        raise ValueError(f'expected logits of shape (N, classes), got {logits.shape}')
    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
        raise ValueError(f'splits must be a positive integer, got {splits!r}')
    count = logits.shape[0]
    if count < splits:
        raise ValueError(f'the Inception Score over {splits} splits needs at least {splits} '
                         f'samples, got {count}')
    part_size = count // splits
    if count % splits:
        log.warning('Inception Score: %d samples do not split evenly into %d parts; the last %d '
                    'are left out', count, splits, count % splits)

    probabilities = special.softmax(logits, axis=1)
    scores = []
    for k in range(splits):
        part = probabilities[k * part_size:(k + 1) * part_size]
        marginal = part.mean(axis=0, keepdims=True)
        kl = special.rel_entr(part, marginal).sum(axis=1)
        scores.append(math.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def kernel_inception_distance(features_a, features_b, num_subsets: int = 100,
                              max_subset_size: int = 1000, seed: int = 0):
    """Return the Kernel Inception Distance (mean, std) between two feature sets.

    Each of `num_subsets` subsets draws m = min(max_subset_size, N_a, N_b) rows of each set
    without replacement (np.random.default_rng(seed)) and computes the unbiased MMD² with the
    kernel k(x, y) = (x·y / D + 1)³:
        1/(m(m-1)) Σ_{i≠j} [k(a_i, a_j) + k(b_i, b_j)] - 2/m² Σ_{i,j} k(a_i, b_j).
    The result is the mean and the population standard deviation over the subsets.
    """
    features_a = np.asarray(features_a, dtype=np.float64)
    features_b = np.asarray(features_b, dtype=np.float64)
    if features_a.ndim != 2 or features_b.ndim != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f'expected two feature arrays (N, D) with the same D, got '
                         f'{features_a.shape} and {features_b.shape}')
    if num_subsets < 1 or max_subset_size < 2:
        raise ValueError(f'num_subsets must be >= 1 and max_subset_size >= 2, got {num_subsets} '
                         f'and {max_subset_size}')
    subset_size = min(max_subset_size, features_a.shape[0], features_b.shape[0])
    if subset_size < 2:
        raise ValueError(f'KID needs at least 2 samples in each set, got {features_a.shape[0]} '
                         f'and {features_b.shape[0]}')

    dim = features_a.shape[1]
    rng = np.random.default_rng(seed)
    m = subset_size
    estimates = np.empty(num_subsets)
    for index in range(num_subsets):
        a = features_a[rng.choice(features_a.shape[0], m, replace=False)]
        b = features_b[rng.choice(features_b.shape[0], m, replace=False)]
        k_aa = (a @ a.T / dim + 1.0) ** 3
        k_bb = (b @ b.T / dim + 1.0) ** 3
        k_ab = (a @ b.T / dim + 1.0) ** 3
        within = (k_aa.sum() - np.trace(k_aa) + k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
        estimates[index] = within - 2.0 * k_ab.sum() / (m * m)
    return float(estimates.mean()), float(estimates.std())


# ---------------------------------------------------------------------------------------------
# Statistics files


def save_stats(path, mu, sigma, overwrite: bool = False, features=None) -> Path:
    """Write `mu` and `sigma` atomically to an uncompressed `.npz`, the format pytorch-fid reads.

    `features`, if given, is stored as a float32 array `features`: a subset of the reference
    features, so that KID can be computed against the file later. pytorch-fid ignores it.
    Raises UserError when `path` exists and `overwrite` is false.
    """
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f'expected mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}')
    arrays = {'mu': mu, 'sigma': sigma}
    if features is not None:
        arrays['features'] = np.asarray(features, dtype=np.float32)
    try:
        return atomic_save_npz(path, overwrite=overwrite, **arrays)
    except FileExistsError:
        raise UserError(f'{path} already exists; choose another path or allow overwriting '
                        'it') from None


def load_reference_features(path):
    """Return the `features` array of a statistics file, or None when it has none."""
    with np.load(path, allow_pickle=False) as data:
        if 'features' not in data.files:
            return None
        return np.asarray(data['features'], dtype=np.float64)


def load_stats(path):
    """Read (mu, sigma) as float64 from a statistics `.npz` written by `save_stats` or pytorch-fid.

    Raises UserError, in one line naming the file, when it is missing, unreadable, lacks `mu` or
    `sigma`, or their shapes do not fit.
    """
    path = Path(path)
    fix = 'create it with python -m ncsn_jax.fid_stats INPUT --out STATS.npz --inception FILE'
    if not path.is_file():
        raise UserError(f'FID statistics file not found: {path}; check the path, or {fix}')
    unreadable = (OSError, ValueError, EOFError, zipfile.BadZipFile)
    try:
        data = np.load(path, allow_pickle=False)
    except unreadable as exc:
        raise UserError(f'cannot read FID statistics from {path}: not a valid .npz file '
                        f'({type(exc).__name__}); {fix}') from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise UserError(f'{path} contains a single .npy array, not an .npz with mu and sigma; '
                        f'{fix}')
    with data:
        missing = [key for key in ('mu', 'sigma') if key not in data.files]
        if missing:
            raise UserError(f'{path} is not an FID statistics file: no {" or ".join(missing)} '
                            f'array (it has {", ".join(data.files) or "none"}); {fix}')
        try:
            mu = np.asarray(data['mu'], dtype=np.float64)
            sigma = np.asarray(data['sigma'], dtype=np.float64)
        except unreadable as exc:
            raise UserError(f'cannot read mu and sigma from {path}: the file is damaged or they '
                            f'are not numeric arrays ({type(exc).__name__}); {fix}') from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise UserError(f'{path}: mu {mu.shape} and sigma {sigma.shape} do not fit (expected (D,) '
                        f'and (D, D)); {fix}')
    return mu, sigma
