"""What the Bento ships besides ``service.py``: settings, image decoding, the model, batching, the HTTP edge.

Nothing here imports from ``training``; the pipeline imports :mod:`serving.images` so that
training and serving decode images with the same code.
"""
