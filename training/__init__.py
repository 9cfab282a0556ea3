"""CIFAR-10 pipeline logic: one module per stage, nothing happens at import time.

Stages, in the order the Airflow DAG (``dags/cifar10_pipeline.py``) calls them:

- ``config``    one frozen :class:`~training.config.PipelineConfig`
- ``fetch``     download a URL (http, https, file, s3, path) into a checksummed cache
- ``archive``   open zip/tar archives safely (no extraction, hostile entries refused)
- ``formats``   read the CIFAR-10 binary release or image folders into arrays
- ``decode_pool`` decode many images in forked worker processes into shared memory
- ``images``    decode any image to RGB 32x32 uint8 (shared with ``service.py``)
- ``prepare``   stratified seeded splits, validation, manifest and content digest
- ``model``     the Keras 3 CNN, preprocessing inside
- ``train``     one MLflow run: fit, evaluate, pictures, ONNX export
- ``jax_loop``  the jitted training loop for the JAX backend (data on the device; GPUs)
- ``plots``     learning curves, confusion matrix, sample grid (PNG)
- ``export``    ONNX export and the Keras/ONNX parity check
- ``tracking``  MLflow tracking URI and experiment, git commit
- ``registry``  register a version, gate it, move the ``champion`` alias
- ``bento``     import the champion into the BentoML store and build the Bento
- ``container`` build the Bento's container image when a builder is present
- ``base_image`` the local Debian base image the container builds on

Beside the DAG: ``serving_io`` (batcher and request guard used by ``service.py``) and
``bento_store`` (Bentos and models to and from S3).
"""
