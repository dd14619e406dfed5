"""Seed entry point: `python scripts/check_env.py [--json]` = `finderpartner check-env`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs from a checkout without installing
from finderpartner.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["check-env", *sys.argv[1:]]))
