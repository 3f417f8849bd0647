# The two set-up commands of README.md. Each installs what it needs into .venv:
# torch (the CPU wheel, pinned: an unpinned torch pulls a multi-GB CUDA build),
# then DeepSpeed built against it, then this package with its test extras.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
DEEPSPEED_VERSION ?= 0.19.8
NPROC ?= 2

# DeepSpeed on the CPU: its CPU accelerator and gloo, one thread per rank.
export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= 1
export PYTHONWARNINGS ?= ignore

.PHONY: demo test clean

$(BIN)/.installed: setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==$(TORCH_VERSION)
	# DeepSpeed's source package imports torch while it builds.
	$(BIN)/pip install -q --no-build-isolation deepspeed==$(DEEPSPEED_VERSION)
	$(BIN)/pip install -q --no-build-isolation -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/torchrun --standalone --nproc_per_node $(NPROC) -m wenet_hooks.demo exp/demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest tests -q -rs

clean:
	rm -rf $(VENV) exp *.egg-info
