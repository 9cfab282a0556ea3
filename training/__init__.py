"""The CIFAR-10 pipeline, grouped by stage; the Airflow DAG (``dags/cifar10_pipeline.py``) calls it.

- ``config``     one frozen :class:`~training.config.PipelineConfig`, overridable from env and DAG params
- ``data``       fetch a URL into a checksummed cache, read archives safely, prepare seeded splits
- ``model``      the Keras 3 network, the training loops, ONNX export, pictures
- ``registry``   MLflow tracking, model versions and the gated ``champion`` alias
- ``packaging``  the BentoML model and Bento, the container image, object storage
- ``console``    ``make pipeline``'s progress console

Imports flow one way: the DAG imports ``training``, ``training`` imports ``serving``
(image decoding and the ONNX session, so training and serving cannot drift apart),
and ``serving`` imports nothing from here. Nothing happens at import time.
"""
