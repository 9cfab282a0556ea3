# The MLflow tracking server with the Postgres driver and boto3 for the S3 artifact store.
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir psycopg2-binary boto3
