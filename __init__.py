"""ComfyUI-ControlNeXt: ComfyUI loads the pack through ``comfy_entrypoint``.

The guard keeps this file importable where there is no package (pytest collecting the
checkout) or no ComfyUI (the core tests); ``controlnext_core`` never needs ComfyUI.
"""
if __package__:
    try:
        import comfy_api.latest  # noqa: F401  (present only inside a ComfyUI)
    except ImportError:
        pass
    else:
        from .nodes import comfy_entrypoint  # noqa: F401

WEB_DIRECTORY = "./js"
