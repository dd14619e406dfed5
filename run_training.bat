@echo off
rem Seed entry point (Windows): trains with the RTX 3060 preset; extra arguments are passed on.
rem Example: run_training.bat --set train.epochs=3
python src\train_clip.py --config configs\clip_base.yaml %*
