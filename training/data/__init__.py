"""Data stage: fetch a dataset URL, read its archive safely, decode images, prepare splits."""
