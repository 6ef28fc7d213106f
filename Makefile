# The README's commands. `make train` and `make test` set everything up first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
APT := DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist

.PHONY: setup data train test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,torch]'
	touch $@

# Debian's Fashion-MNIST IDX files: installed when missing and we may (root or password-less sudo).
data:
	@if [ -f $(FASHION_MNIST) ]; then exit 0; \
	elif [ "$$(id -u)" = 0 ]; then $(APT) || (apt-get update -q && $(APT)); \
	elif sudo -n true 2>/dev/null; then sudo $(APT) || (sudo apt-get update -q && sudo $(APT)); \
	else echo "Fashion-MNIST is missing ($(FASHION_MNIST)). Run:" \
	  "sudo apt-get install dataset-fashion-mnist   and then make train again."; exit 1; fi

train: setup data  ## make train ARGS="model=lenet trainer.epochs=3"
	$(PY) -m cnnjax.train $(ARGS)

lint: setup
	$(PY) -m ruff check cnnjax tests

test: setup data lint
	$(PY) -m pytest

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache .ruff_cache
