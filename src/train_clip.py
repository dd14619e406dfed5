"""Seed entry point: `python src/train_clip.py --config FILE [--resume PATH|auto] [--create_sample_data]`.

The same as `finderpartner train ...`; this folder is on sys.path when run as a script, so no install is needed.
"""

import sys

from finderpartner.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
