class ControlNeXtError(ValueError):
    """The pack's one error type: its message says what was wrong and what to do.

    A ValueError so ComfyUI shows it on the node as a user error, not as a crash.
    """
