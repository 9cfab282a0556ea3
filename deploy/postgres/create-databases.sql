-- Runs once, on an empty data volume: POSTGRES_DB (mlflow) exists already; Airflow and MLflow's login
-- (users and permissions) get their own databases.
CREATE DATABASE airflow;
CREATE DATABASE mlflow_auth;
