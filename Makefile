# The README's commands. `make train` and `make test` set everything up first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
APT := DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist

.PHONY: setup onednn data train test lint clean

setup: $(VENV)/.installed onednn

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,torch,onednn,onnx]'
	touch $@

# cnnjax/_onednn.so: oneDNN's convolutions as XLA custom calls (see cnnjax/onednn.py), against
# the oneDNN that pip put in the venv (lib/ and include/) and jaxlib's FFI headers.
ONEDNN_SO := cnnjax/_onednn.so
onednn: $(ONEDNN_SO)

$(ONEDNN_SO): cnnjax/csrc/onednn_conv.cc $(VENV)/.installed
	$(CXX) -O2 -std=c++17 -shared -fPIC -Wno-return-type \
	  -I"$$($(PY) -c 'import jax.ffi; print(jax.ffi.include_dir())')" -I$(VENV)/include \
	  $< -o $@ -L$(VENV)/lib -ldnnl -lgomp -Wl,-rpath,$(abspath $(VENV)/lib)

# Debian's Fashion-MNIST IDX files: installed when missing and we may (root or password-less sudo).
data:
	@if [ -f $(FASHION_MNIST) ]; then exit 0; \
	elif [ "$$(id -u)" = 0 ]; then $(APT) || (apt-get update -q && $(APT)); \
	elif sudo -n true 2>/dev/null; then sudo $(APT) || (sudo apt-get update -q && sudo $(APT)); \
	else echo "Fashion-MNIST is missing ($(FASHION_MNIST)). Run:" \
	  "sudo apt-get install dataset-fashion-mnist   and then make train again."; exit 1; fi

train: setup data  ## make train ARGS="model=lenet trainer.epochs=3"
	$(PY) -m cnnjax.train $(ARGS)

# ruff, then the architecture: the import contracts in pyproject.toml ([tool.importlinter])
lint: setup
	$(PY) -m ruff check cnnjax tests experiments
	$(VENV)/bin/lint-imports

test: setup data lint
	$(PY) -m pytest

clean:
	rm -rf $(VENV) $(ONEDNN_SO) outputs multirun .pytest_cache .ruff_cache
