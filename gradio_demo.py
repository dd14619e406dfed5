"""Seed entry point: `python gradio_demo.py --model_path DIR [--index INDEX | --images DIR]` = `finderpartner demo`.

Serves the web demo on http://127.0.0.1:7860 (this machine only unless --host says otherwise).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # runs from a checkout without installing
from finderpartner.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
