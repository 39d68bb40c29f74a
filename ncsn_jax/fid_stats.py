"""Compute the FID statistics (mean and covariance of the Inception pool features) of an image set.

    python -m ncsn_jax.fid_stats INPUT --out STATS.npz --inception INCEPTION.msgpack \
        [--batch-size N] [--force]

INPUT is a folder of PNG/JPEG images (searched recursively) or an `.npz` whose `images` array is
NHWC, uint8 in [0, 255] or float in [0, 1]. Every image is used. The output is an `.npz` with `mu`
and `sigma`, which pytorch-fid and `ncsn_jax.fid.load_stats` read. It is written atomically and
only after all features are computed, so a failed run leaves no file behind.
"""

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ncsn_jax.errors import UserError
from ncsn_jax.fid import DEFAULT_BATCH_SIZE, compute_statistics, load_inception, save_stats
from ncsn_jax.image_io import open_image_source
from ncsn_jax.inception import INPUT_SIZE

# Reference features kept for KID: KID draws subsets of at most 1000 samples, so 2000 suffice.
DEFAULT_KID_FEATURES = 2000

log = logging.getLogger('ncsn_jax.fid_stats')


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a positive integer, got {text!r}') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'expected a positive integer, got {value}')
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m ncsn_jax.fid_stats',
        description='Compute FID statistics (mu, sigma of the 2048-d Inception pool features) of '
                    'a folder of PNG/JPEG images or an .npz with an images array.')
    parser.add_argument('input', metavar='INPUT',
                        help='folder of .png/.jpg/.jpeg images (recursive) or .npz with an images '
                             'array (N, H, W, C), uint8 in [0, 255] or float in [0, 1]')
    parser.add_argument('--out', required=True, metavar='STATS.npz',
                        help='output .npz with mu and sigma')
    parser.add_argument('--inception', required=True, metavar='FILE',
                        help='FID Inception parameter file made by convert/torch_to_flax.py from '
                             'pt_inception-2015-12-05-6726825d.pth')
    parser.add_argument('--batch-size', type=_positive_int, default=DEFAULT_BATCH_SIZE,
                        metavar='N', help=f'images per network call (default {DEFAULT_BATCH_SIZE})')
    parser.add_argument('--force', action='store_true', help='replace an existing --out file')
    parser.add_argument('--kid-features', type=int, default=DEFAULT_KID_FEATURES, metavar='N',
                        help='also store a seeded random subset of N pool features (all when there '
                        'are fewer) so that main.py can compute KID against this file; 0 stores '
                        f'none (default {DEFAULT_KID_FEATURES}, about 8 MB per 1000)')
    return parser


def compute_pool_features(source, inception, *, size: int | None = None) -> np.ndarray:
    """Return the (N, 2048) pool features of every image of `source`, with a progress bar."""
    features = []
    with tqdm(total=source.count, unit='img', desc='Inception features') as progress:
        for batch in source.batches(inception.batch_size, size=size):
            pool, _ = inception(batch)
            features.append(pool)
            progress.update(batch.shape[0])
    return np.concatenate(features)


def run(args) -> None:
    """Compute and write the statistics. Raises UserError for expected failures."""
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f'--out {out} is a folder; give a file path such as {out / "stats.npz"}')
    if out.exists() and not args.force:
        raise UserError(f'{out} already exists; pass --force to replace it')

    source = open_image_source(args.input)
    if source.count < 2:
        raise UserError(f'{args.input} contains only {source.count} image, but a covariance needs '
                        'at least 2')
    inception = load_inception(args.inception, batch_size=args.batch_size)

    size = None
    if source.image_shape is None:
        size = INPUT_SIZE
        log.info('the images have different sizes; each is resized to %dx%d on the host',
                 INPUT_SIZE, INPUT_SIZE)
    log.info('computing Inception features of %d images from %s', source.count, args.input)
    features = compute_pool_features(source, inception, size=size)

    mu, sigma = compute_statistics(features)
    kept = None
    if args.kid_features > 0:
        rng = np.random.default_rng(0)
        count = min(args.kid_features, features.shape[0])
        kept = features[np.sort(rng.choice(features.shape[0], count, replace=False))]
    save_stats(out, mu, sigma, overwrite=args.force, features=kept)
    log.info('wrote FID statistics of %d images to %s', features.shape[0], out)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # INFO for this package only: JAX logs backend probing at INFO.
    logging.basicConfig(format='%(levelname)s: %(message)s')
    logging.getLogger('ncsn_jax').setLevel(logging.INFO)
    try:
        run(args)
    except UserError as exc:
        log.error('%s', exc)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
