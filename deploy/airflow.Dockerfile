# Airflow (all components and Celery workers) with the pipeline and its locked dependencies.
# Build from the repository root (compose does): requirements come from uv.lock via
#   uv export --frozen --no-dev --no-hashes --no-emit-project -o deploy/requirements.txt
FROM apache/airflow:3.3.2-python3.11
USER root
RUN apt-get update && apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/*
USER airflow
COPY deploy/requirements.txt /tmp/requirements.txt
# The Celery provider, redis-py and psycopg2 come from the lock like everything else.
RUN pip install --no-cache-dir -r /tmp/requirements.txt
COPY --chown=airflow:root dags /opt/cifar10/dags
COPY --chown=airflow:root training /opt/cifar10/training
COPY --chown=airflow:root service.py bentofile.yaml /opt/cifar10/
WORKDIR /opt/cifar10
