"""Try the pack without downloading anything (README, "Try it without downloading anything"):
``python -m controlnext_demo`` trains a toy world and a ControlNeXt into a ComfyUI and queues the
template that shows the control, a sample without it and the same sample with it (cli.py)."""
