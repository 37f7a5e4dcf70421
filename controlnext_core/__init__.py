"""ControlNeXt in plain torch: encoders, layout detection and the cross-norm injection.

Imports nothing from ComfyUI, so scripts and tests can use it on their own.
"""
from .cross_norm import add_control, add_unit_control, unit_control
from .errors import ControlNeXtError
from .families import FAMILIES, RULES, InjectionRule, detect_layout, injection_block, injection_channels, rule_for
from .model import (ControlNeXt, bind, fit_control, inject, load_controlnext, load_encoder, load_encoder_file,
                    load_state_dict_file, read_file_metadata, resize_control)

__all__ = [
    "ControlNeXt",
    "ControlNeXtError",
    "FAMILIES",
    "InjectionRule",
    "RULES",
    "add_control",
    "add_unit_control",
    "bind",
    "detect_layout",
    "fit_control",
    "inject",
    "injection_block",
    "injection_channels",
    "load_controlnext",
    "load_encoder",
    "load_encoder_file",
    "load_state_dict_file",
    "read_file_metadata",
    "resize_control",
    "rule_for",
    "unit_control",
]
