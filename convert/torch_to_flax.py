"""Convert an official NCSNv2 checkpoint, or pytorch-fid's Inception weights, to ncsn-jax.

    python convert/torch_to_flax.py CHECKPOINT --out PATH [--no-ema] [--config CONFIG] [--force]
    python convert/torch_to_flax.py CHECKPOINT --out PATH --train-state [--config CONFIG] [--force]

Reads the file with torch.load(weights_only=True), which never runs code stored in the file.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ncsn_jax.cli import run_main, setup_logging  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[1])
    parser.add_argument('checkpoint', help='PyTorch file: the official list layout '
                        '[model, optimizer, epoch, step, ema_shadow], a state dict, or '
                        'pt_inception-2015-12-05-6726825d.pth')
    parser.add_argument('--out', required=True, help='output ncsn-jax parameter file (.msgpack)')
    parser.add_argument('--no-ema', action='store_true',
                        help='convert the raw model weights even when an EMA shadow is present')
    parser.add_argument('--config', help='config name in configs/ or a path; checks the '
                        'architecture, ngf and channels, and supplies the sigma table when the '
                        'checkpoint has none')
    parser.add_argument('--train-state', action='store_true',
                        help='write the full training state (raw weights, EMA shadow, Adam state, '
                        'epoch, step) as a train_state file for python -m ncsn_jax.train '
                        '--init-from')
    parser.add_argument('--force', action='store_true', help='replace an existing --out file')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.train_state:
        from ncsn_jax.convert import convert_train_state_file
        from ncsn_jax.errors import UserError
        if args.no_ema:
            raise UserError('--no-ema does not apply to --train-state, which keeps both the raw '
                            'weights and the EMA shadow; drop one of the two flags')
        convert_train_state_file(args.checkpoint, args.out, config=args.config, force=args.force)
        return 0
    from ncsn_jax.convert import convert_file
    convert_file(args.checkpoint, args.out, ema=not args.no_ema, config=args.config,
                 force=args.force)
    return 0


if __name__ == '__main__':
    setup_logging()
    sys.exit(run_main(main))
