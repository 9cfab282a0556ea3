-- Runs once, on an empty data volume: POSTGRES_DB (mlflow) exists already; Airflow gets its own database.
CREATE DATABASE airflow;
