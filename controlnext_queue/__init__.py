"""Headless queueing for ComfyUI: ``python -m controlnext_queue WORKFLOW.json --server URL --out DIR``.

Standard library only, so it runs with any Python 3.10+, on the server's machine or another.
"""
