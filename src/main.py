"""Seed entry point: `python src/main.py --model outputs/best_model --prompt "..." [--images DIR | --index DIR]`.

The same as `finderpartner search ...`: ranks a gallery by a text description.
"""

import sys

from finderpartner.cli import main

if __name__ == "__main__":
    sys.exit(main(["search", *sys.argv[1:]]))
