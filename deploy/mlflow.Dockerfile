# The MLflow tracking server with its login (basic-auth), the PostgreSQL driver and boto3 for the S3
# artifact store: exactly uv.lock's versions, checked against their hashes (deploy/requirements/
# mlflow-server.txt, from `make requirements`), so it is the MLflow the pipeline runs, on a base pinned
# by digest. It keeps nothing on disk (PostgreSQL and S3 hold everything) and runs as a plain user.
FROM docker.io/library/python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b
COPY requirements/mlflow-server.txt /tmp/requirements.txt
RUN pip install --no-cache-dir --require-hashes -r /tmp/requirements.txt && rm /tmp/requirements.txt \
    && useradd --system --uid 10001 --create-home mlflow
COPY mlflow/basic_auth.ini /etc/mlflow/basic_auth.ini
USER mlflow
EXPOSE 5000
