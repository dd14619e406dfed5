"""Seed entry point: `python export_clip.py --model_path DIR --output_dir DIR [--fp16] [--int8]` = `finderpartner export`.

Writes image_encoder.onnx, text_encoder.onnx and clip.onnx with the tokenizer and preprocessing, then checks
them against PyTorch with onnxruntime.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # runs from a checkout without installing
from finderpartner.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
