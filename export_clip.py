"""Seed entry point: `python export_clip.py --model_path DIR --output_dir DIR [--fp16] [--int8]` = `finderpartner export`.

Writes onnx/model.onnx (optimum's CLIP zero-shot graph), onnx/text_model.onnx and onnx/vision_model.onnx (sharing
one weights file) with the config, tokenizer and preprocessing, then checks them against PyTorch with onnxruntime.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # runs from a checkout without installing
from finderpartner.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
