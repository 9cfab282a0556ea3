"""What a deployment checks before it starts the pipeline's services: preflight.py."""
