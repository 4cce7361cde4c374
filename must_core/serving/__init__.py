"""Inference serving core: image decoding with limits, a model cache and dynamic micro-batching.

Framework-free (no FastAPI): the API wires these into routes.
"""
