"""Drift monitoring: read what the service saw, log it to MLflow, and call for retraining on drift.

The service keeps a drift score of its recent inputs against the training data (``serving/drift.py``)
and exports it with the predicted-class counts and a confidence histogram on ``/metrics``. The
``cifar10_drift_monitor`` DAG scrapes them on a schedule (:mod:`training.monitor.watch`) and, when
the score passes ``drift_threshold``, emits an event on the asset named here, on which
``cifar10_pipeline`` is scheduled as well as on time.
"""

# The asset both DAGs name: the monitor emits events on it, the pipeline is scheduled on it.
DRIFT_ASSET_NAME = "cifar10_drift"
DRIFT_ASSET_URI = "cifar10://serving/drift"
