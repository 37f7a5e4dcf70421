"""Preprocessors: the control images ControlNeXt models were trained on, made from pictures or frames.

Plain torch/numpy/OpenCV (never ComfyUI). Images are ComfyUI-style ``[B, H, W, C]`` floats in
[0, 1]; every function takes a whole batch (video frames) and returns one.
"""
