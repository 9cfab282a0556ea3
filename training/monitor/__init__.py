"""Drift monitoring: the ``cifar10_drift_monitor`` DAG scrapes the service's drift score (``serving/drift.py``)
and class counts, logs them to MLflow (:mod:`training.monitor.watch`) and, at ``drift_threshold``, emits an
event on the asset named here, on which ``cifar10_pipeline`` is scheduled.
"""

# The asset both DAGs name: the monitor emits events on it, the pipeline is scheduled on it.
DRIFT_ASSET_NAME = "cifar10_drift"
DRIFT_ASSET_URI = "cifar10://serving/drift"
