"""Export an ncsn-jax score_model or train_state file as an official NCSNv2 PyTorch checkpoint.

    python convert/flax_to_torch.py PARAMS --out CHECKPOINT.pth [--force]

The output is the list [model_state, optimizer_state, epoch, step, ema_shadow] that the official
training loop saves, with `module.`-prefixed model keys and the `sigmas` buffer.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ncsn_jax.cli import run_main, setup_logging  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[1])
    parser.add_argument('params', help='ncsn-jax file: a score_model file (convert/torch_to_flax.py '
                        'or a training run\'s score_model.msgpack) or a train_state checkpoint')
    parser.add_argument('--out', required=True, help='output PyTorch checkpoint (.pth)')
    parser.add_argument('--force', action='store_true', help='replace an existing --out file')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from ncsn_jax.convert import export_file
    export_file(args.params, args.out, force=args.force)
    return 0


if __name__ == '__main__':
    setup_logging()
    sys.exit(run_main(main))
