import sys

try:
    from .cli import main
except ModuleNotFoundError as error:  # torch, numpy, PIL: a python without ComfyUI's packages
    sys.exit(f"{error}. Run this with the python of the ComfyUI it is for (the one whose venv has torch).")

sys.exit(main())
