"""The headless training command: Train ControlNeXt's run from a terminal, on one process or on the
processes torchrun or ``accelerate launch`` start (``python -m controlnext_train --help``)."""
