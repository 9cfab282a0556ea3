"""The servers ``bench/peers.py`` compares, one module each, all serving the same ONNX model.

Each module runs in its peer's own virtual environment from the repository root, as every
bench module runs, so every peer decodes with :mod:`serving.images` and runs the model with
:mod:`serving.model`, as ``service.py`` does: only the server around them differs.
"""
