# Airflow (all components and Celery workers) with the pipeline and its locked dependencies.
# Build from the repository root (compose does). deploy/requirements/airflow.txt is uv.lock's
# dependencies with their hashes (`make requirements`); pip checks every download against them.
# The base is the exact Airflow release; pin its digest too where a registry is reachable
# (docker buildx imagetools inspect apache/airflow:3.3.2-python3.11).
# The image has no .git: GIT_COMMIT (compose passes it: GIT_COMMIT=$(git rev-parse HEAD)) is the commit the
# training runs record (training/registry/tracking.py git_commit reads CIFAR10_GIT_COMMIT).
FROM apache/airflow:3.3.2-python3.11
USER root
RUN apt-get update && apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/*
USER airflow
COPY deploy/requirements/airflow.txt /tmp/requirements.txt
# The Celery provider, redis-py and psycopg2 come from the lock like everything else.
RUN pip install --no-cache-dir --require-hashes -r /tmp/requirements.txt
COPY --chown=airflow:root dags /opt/cifar10/dags
COPY --chown=airflow:root training /opt/cifar10/training
COPY --chown=airflow:root service.py bentofile.yaml /opt/cifar10/
WORKDIR /opt/cifar10
# Declared last: RUN steps after an ARG rebuild when its value changes, and it changes every commit.
ARG GIT_COMMIT=
ENV CIFAR10_GIT_COMMIT=${GIT_COMMIT}
LABEL org.opencontainers.image.title="cifar10-airflow" org.opencontainers.image.revision="${GIT_COMMIT}"
