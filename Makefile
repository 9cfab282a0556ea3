# Two commands do everything on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
# Any Python 3 bootstraps uv; uv then finds (or downloads) the Python the lock is for.
PYTHON ?= python3
PROJECT_PYTHON ?= 3.11
VENV := .venv
STATE ?= $(CURDIR)/.state
# Unset: CIFAR10_DATA_URL, else the official CIFAR-10 release (training/config.py).
DATA_URL ?=
# Unset: the recipe preset's value (training/config.py). RECIPE: default | quick | tiny.
EPOCHS ?=
MAX_TRAIN_IMAGES ?=
RECIPE ?=
PORT ?= 3000
# The address every server these targets start listens on: this machine only. `make serve HOST=0.0.0.0`
# (or `make up HOST=...`) opens them to the network. Only a HOST given on make's command line counts:
# one inherited from the shell (zsh sets HOST to the machine's name) would expose them unasked.
ifneq ($(origin HOST),command line)
HOST := 127.0.0.1
endif
# The stacks (make up) bind every part to it.
export STACK_HOST := $(HOST)
# make up/down: the local stack, or STACK=distributed, under supervisord; PARTS: some of its parts.
STACK_CTL = $(VENV)/bin/python -m training.deploy.stack
PARTS ?=
# What runs: supervisord's own view; `$(SUPERVISORCTL) status PART:*` fails unless all of PART runs.
SUPERVISORCTL = $(VENV)/bin/supervisorctl -s unix://$(abspath $(STATE))/stack/supervisor.sock
# Unset: `make serve` serves the champion's Bento (the registry names it); or a Bento tag.
BENTO_TAG ?=
# Ports of the local stack (`make up`); the Bento server uses PORT.
AIRFLOW_PORT ?= 8080
MLFLOW_PORT ?= 5000
# Scheduled retraining: a cron expression or preset; "none": no timed runs (drift events and manual runs only).
export CIFAR10_SCHEDULE ?= @weekly
# The drift monitor's checks of the served model (cifar10_drift_monitor): cron, or "none".
export CIFAR10_MONITOR_SCHEDULE ?= */15 * * * *
# `make pipeline` stops the Airflow it started once the run ends (so its drift monitor is off: nothing
# is served meanwhile); KEEP_STACK=1 leaves it running
# (make down stops it). An Airflow that was already running (make up) is always left running.
KEEP_STACK ?=
# The Airflow that `make pipeline` triggers and follows: the local one on AIRFLOW_PORT unless
# AIRFLOW_API_URL names another (then also AIRFLOW_API_USER and AIRFLOW_API_PASSWORD).
export AIRFLOW_PORT

# Everything local lives in $(STATE): Airflow (SQLite), MLflow (SQLite + artifacts), BentoML store, data.
export CIFAR10_STATE_DIR := $(STATE)
export AIRFLOW_HOME := $(STATE)/airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN ?= sqlite:///$(STATE)/airflow/airflow.db
export BENTOML_HOME ?= $(STATE)/bentoml
export BENTOML_DO_NOT_TRACK := True
export MLFLOW_TRACKING_URI ?= sqlite:///$(STATE)/mlflow/mlflow.db
export TF_CPP_MIN_LOG_LEVEL := 2
export PYTHONUNBUFFERED := 1
# Every process a target starts (Airflow tasks, bentoml, the tests' servers) finds the project's
# tools first: BentoML and MLflow call `uv` through PATH.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

# The pipeline reads a local archive (file:// or a path) only under CIFAR10_DATA_ROOTS: the folder of a
# local DATA_URL is added for the Airflow that make starts (one already running keeps its own roots).
DATA_FILE = $(if $(filter file://%,$(DATA_URL)),$(patsubst file://%,%,$(DATA_URL)),$(if $(findstring ://,$(DATA_URL)),,$(DATA_URL)))
ifneq ($(DATA_FILE),)
export CIFAR10_DATA_ROOTS := $(abspath $(dir $(DATA_FILE)))$(if $(CIFAR10_DATA_ROOTS),:$(CIFAR10_DATA_ROOTS))
endif

# DAG params for `make pipeline`: only what was set, so the recipe preset fills the rest.
comma := ,
PIPELINE_FIELDS = $(if $(DATA_URL),$(comma) "data_url": "$(DATA_URL)")$(if $(EPOCHS),$(comma) "epochs": $(EPOCHS))$(if \
	$(MAX_TRAIN_IMAGES),$(comma) "max_train_images": $(MAX_TRAIN_IMAGES))$(if $(RECIPE),$(comma) "recipe": "$(RECIPE)")
PIPELINE_CONF = {$(patsubst $(comma)%,%,$(strip $(PIPELINE_FIELDS)))}

# uv itself lives in its own small venv, so that `uv sync` never removes it.
UV := .uv/bin/uv

.PHONY: venv run pipeline pipeline-debug serve rollback up down status airflow-ui mlflow-ui test test-fast test-service clean base-image image requirements

# The environment is (re)built only when pyproject.toml or uv.lock changed.
$(VENV)/.synced: pyproject.toml uv.lock
	@test -x $(UV) || { $(PYTHON) -m venv .uv && .uv/bin/pip install -q uv==0.13.9; } || { \
		echo "make: could not bootstrap uv with '$(PYTHON) -m venv': install Python 3 with its venv module" \
		     "(Debian/Ubuntu: apt-get install python3-venv) or set PYTHON=/path/to/python3" >&2; exit 1; }
	$(UV) sync --frozen --python $(PROJECT_PYTHON)
	@touch $@

venv: $(VENV)/.synced

$(STATE)/airflow/.migrated: | $(VENV)/.synced
	mkdir -p $(STATE)/airflow
	$(VENV)/bin/airflow db migrate > $(STATE)/airflow/migrate.log 2>&1 || { tail -20 $(STATE)/airflow/migrate.log; exit 1; }
	@touch $@

## make run: one run of the DAG in Airflow (make pipeline) on DATA_URL, then serve its Bento on PORT
run: pipeline serve

## make pipeline: one ordinary run of the DAG in Airflow's scheduler, triggered through its REST API and
## followed on the console; Airflow is started for it unless it runs already. Whole output: $(STATE)/logs/
pipeline: $(VENV)/.synced
	@if [ -n "$$AIRFLOW_API_URL" ]; then echo "Using the Airflow at $$AIRFLOW_API_URL"; \
	elif $(SUPERVISORCTL) status 'airflow:*' >/dev/null; then \
		echo "Using the Airflow that is already running on this state (make down stops it)"; \
		[ -z "$(DATA_FILE)" ] || echo "It reads local archives only under the CIFAR10_DATA_ROOTS it started with;" \
			"to add $(abspath $(dir $(DATA_FILE))): make down, then run this again"; \
	else \
		if [ -z "$(KEEP_STACK)" ]; then trap '$(STACK_CTL) down airflow' EXIT; trap 'exit 130' INT TERM; \
			export CIFAR10_MONITOR_SCHEDULE=none; fi; \
		echo "Starting Airflow (scheduler, DAG processor, API server: UI on http://localhost:$(AIRFLOW_PORT)/);" \
		     "logs: $(STATE)/stack/airflow-*.log"; \
		$(STACK_CTL) up airflow || exit 1; \
		[ -z "$(KEEP_STACK)" ] || echo "KEEP_STACK=1: Airflow keeps running after the run; make down stops it"; \
	fi; \
	$(VENV)/bin/python -m training.console --log $(STATE)/logs/pipeline-$$(date +%Y%m%d-%H%M%S).log \
		--dag cifar10_pipeline --conf '$(PIPELINE_CONF)'

## make pipeline-debug: the DAG in this one process (`airflow dags test`: no scheduler, executor or API
## server), for debugging a task: Airflow's own output on the terminal, so breakpoint() and print() work
pipeline-debug: $(VENV)/.synced $(STATE)/airflow/.migrated
	$(VENV)/bin/airflow dags test cifar10_pipeline -c '$(PIPELINE_CONF)'

## make serve: serve the champion's Bento, as the MLflow registry names it (BENTO_TAG=...: that Bento), on
## HOST:PORT (Swagger UI on http://localhost:$(PORT)/)
serve: $(VENV)/.synced
	@bento="$(BENTO_TAG)"; what=BENTO_TAG; [ -n "$$bento" ] || { what="the champion's Bento"; \
		bento=$$($(VENV)/bin/python -m training.deploy.champion bento) || exit 1; }; \
	echo "Serving $$bento ($$what) on $(HOST):$(PORT). Swagger UI: http://localhost:$(PORT)/  Try it (Ctrl-C stops it):"; \
	echo "  curl -X POST http://localhost:$(PORT)/predict/ -F file=@car2.png   (any PNG or JPEG)"; \
	exec $(VENV)/bin/bentoml serve "$$bento" --host $(HOST) --port $(PORT)

## make rollback: champion back to the previous champion (VERSION=N: to version N), with REASON="..."
## recorded; its Bento is rebuilt only if gone. The server of `make up` follows the alias by itself, with
## no request dropped (training/deploy/follow.py); a `make serve` is restarted by hand.
## A version that failed verify or lost the quality gate needs FORCE=1 and a REASON.
VERSION ?=
REASON ?=
FORCE ?=
rollback: $(VENV)/.synced
	$(VENV)/bin/python -m training.deploy.champion rollback $(if $(VERSION),--to $(VERSION)) \
		$(if $(REASON),--reason "$(REASON)") $(if $(filter 1 true yes,$(FORCE)),--force)
	@if $(SUPERVISORCTL) status bento:follow >/dev/null; then \
		echo "The server of make up switches to it within CIFAR10_FOLLOW_INTERVAL seconds (log: $(STATE)/stack/follow.log)"; fi

## make up: Airflow (UI on AIRFLOW_PORT), the MLflow server (MLFLOW_PORT) and the champion's Bento behind nginx (PORT;
## the Bento itself on loopback, BENTO_PORT) in the background on the same state, all on HOST, run by supervisord
## (training/deploy/stack.py); the Bento follows the champion alias (training/deploy/follow.py). Logs in $(STATE)/stack.
## STACK=distributed: compose's parts as processes (docs/deploy.md). make status: what runs; make down stops it.
up: $(VENV)/.synced
	AIRFLOW_PORT=$(AIRFLOW_PORT) MLFLOW_PORT=$(MLFLOW_PORT) PROXY_PORT=$(PORT) $(STACK_CTL) up $(PARTS)

down:
	@test ! -x $(VENV)/bin/python || $(STACK_CTL) down $(PARTS)

status: $(VENV)/.synced
	@$(SUPERVISORCTL) status $(PARTS:%='%:*') || echo "(make up starts what is not running; logs in $(STATE)/stack)"

## make airflow-ui: Airflow (scheduler, DAG processor, triggerer, API server, UI on HOST:$(AIRFLOW_PORT)) on the
## same state, until Ctrl-C; password in $(STATE)/airflow/simple_auth_manager_passwords.json.generated
airflow-ui: $(VENV)/.synced
	@if $(SUPERVISORCTL) status 'airflow:*' >/dev/null; then \
		echo "Airflow already runs on this state (make down stops it): http://localhost:$(AIRFLOW_PORT)/"; exit 0; fi; \
	trap '$(STACK_CTL) down airflow' EXIT; trap 'exit 130' INT TERM; \
	$(STACK_CTL) up airflow || exit 1; \
	echo "Airflow UI: http://localhost:$(AIRFLOW_PORT)/ (Ctrl-C stops it); its logs follow"; \
	tail -qn 0 -F $(STATE)/stack/airflow-*.log

## make mlflow-ui: the MLflow UI on HOST:$(MLFLOW_PORT) over the same SQLite store and artifacts
mlflow-ui: $(VENV)/.synced
	$(VENV)/bin/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --host $(HOST) --port $(MLFLOW_PORT)

## make test: every tier: unit, service (real bentoml serve), e2e (real Airflow runs, containers, PostgreSQL)
test: $(VENV)/.synced
	$(VENV)/bin/python -m pytest -v --durations=15

## make test-fast: the unit tier (about 2 minutes, no servers)
test-fast: $(VENV)/.synced
	$(VENV)/bin/python -m pytest tests/unit

## make test-service: the service tier (BentoML in process and a real `bentoml serve`)
test-service: $(VENV)/.synced
	$(VENV)/bin/python -m pytest tests/service

# stops the stack before its state folder goes away
clean: down
	rm -rf $(STATE)

## make requirements: each image's requirements, exactly uv.lock's versions with their hashes, into
## deploy/requirements/ (after `uv lock`; a unit test fails while they differ from the lock)
REQUIREMENTS ?= deploy/requirements
requirements:
	@test -x $(UV) || $(MAKE) --no-print-directory venv
	$(UV) export --frozen --no-header --no-emit-project --only-group serving -q -o $(REQUIREMENTS)/serving.txt
	$(UV) export --frozen --no-header --no-emit-project --only-group mlflow-server -q -o $(REQUIREMENTS)/mlflow-server.txt
	$(UV) export --frozen --no-header --no-emit-project --only-group seaweedfs -q -o $(REQUIREMENTS)/seaweedfs.txt
	$(UV) export --frozen --no-header --no-emit-project --no-dev -q -o $(REQUIREMENTS)/airflow.txt

## make base-image: the local Debian base of the Bento image (rebuilt only when its recipe changed)
base-image: $(VENV)/.synced
	$(VENV)/bin/python -m training.packaging.container base-image

## make image: containerize the champion's Bento (podman/buildah, private store in $(STATE)/containers)
## and export it as an OCI archive, $(STATE)/cifar10-classifier-<version>.oci.tar
image: $(VENV)/.synced base-image
	$(VENV)/bin/python -m training.packaging.container image --bento "$$($(VENV)/bin/python -m training.deploy.champion bento)"
