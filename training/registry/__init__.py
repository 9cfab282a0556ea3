"""MLflow: tracking set-up, task-attempt bookkeeping, model versions and the gated champion alias."""
