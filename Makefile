# The commands a user types; each sets up the virtual environment in .venv first.
VENV := .venv
PYTHON := $(VENV)/bin/python

.PHONY: venv test lint demo train train-deployment gpu-train results pilot local-test sample bench-inference bench-federation bench-training bench-phantoms bench-metrics clean export push-shiny

$(VENV)/.installed: requirements.txt requirements-int8.txt requirements-train.txt pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements-train.txt
	$(VENV)/bin/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

# Two workers, each test file on one (its fixtures shared): the suite waits on processes and
# heartbeats as much as it computes (8.7 min instead of 11.4 on 2 cores).
test: lint
	$(PYTHON) -m pytest -n 2 --dist loadfile

demo: venv
	$(PYTHON) test/demo.py

# Simulation engine (Ray), submitted with `flwr run`; see README "Train".
train: venv
	$(PYTHON) -m train --sites 3 --fold 0

# Deployment engine on localhost: a SuperLink and one SuperNode per site, no Ray.
train-deployment: venv
	$(PYTHON) -m train --engine deployment --sites 3 --fold 0 --work work/deployment

# A paper-scale fold on a GPU machine (phantoms made there); results in build/gpu-train.
gpu-train:
	bash bench/gpu_train.sh

results: venv
	$(PYTHON) -m study all

pilot: venv
	$(PYTHON) -m study pilot

local-test: venv
	test/run_local_test.sh

bench-inference: venv
	$(PYTHON) bench/bench_inference.py --tune

bench-federation: venv
	$(PYTHON) bench/bench_federation.py

bench-training: venv
	$(PYTHON) bench/bench_training.py --data work/bench-training

sample: venv
	$(PYTHON) -m phantoms --out test/sample --cases 1 --size 128 128 128 --seed 2026 --layout challenge --name sample --family reference

bench-phantoms: venv
	$(PYTHON) bench/bench_phantoms.py

bench-metrics: venv
	$(PYTHON) bench/bench_metrics.py

export:
	submit/submit.sh export

push-shiny:
	submit/submit.sh push-shiny "$(REGISTRY)"

clean:
	rm -rf $(VENV) work .pytest_cache
