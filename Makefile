# The two set-up commands of README.md. Each installs what it needs into .venv:
# torch (the CPU wheel, pinned: an unpinned torch pulls a multi-GB CUDA build),
# then DeepSpeed built against it, then this package as users install it: a
# wheel, not an editable install, so the tests see what a user's pip would put
# in site-packages.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
DEEPSPEED_VERSION ?= 0.19.8
NPROC ?= 2
WHEEL_DIR := dist
SOURCES := pyproject.toml setup.py wenet_hooks.pth $(shell find wenet_hooks conf -name '*.py' -o -name '*.yaml')

# DeepSpeed on the CPU: its CPU accelerator and gloo, one thread per rank.
export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= 1
export PYTHONWARNINGS ?= ignore
# The small ops DeepSpeed JIT-compiles at its first launch, kept with this venv: a compile
# killed half-way elsewhere leaves a lock in the shared cache that would stall every launch.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: demo test compat gpu-check device-bundle clean

$(BIN)/.stack:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==$(TORCH_VERSION)
	# DeepSpeed's source package imports torch while it builds.
	$(BIN)/pip install -q wheel "setuptools<81"
	$(BIN)/pip install -q --no-build-isolation deepspeed==$(DEEPSPEED_VERSION)
	touch $@

$(BIN)/.installed: $(BIN)/.stack $(SOURCES)
	rm -rf $(WHEEL_DIR) build
	$(BIN)/pip wheel -q --no-deps --no-build-isolation -w $(WHEEL_DIR) .
	$(BIN)/pip install -q --force-reinstall --no-deps $(WHEEL_DIR)/wenet_hooks-*.whl
	$(BIN)/pip install -q "$$(ls $(WHEEL_DIR)/wenet_hooks-*.whl)[test]"
	rm -rf build
	touch $@

demo: $(BIN)/.installed
	PYTHONPATH=tests $(BIN)/torchrun --standalone --nproc_per_node $(NPROC) recipes/demo/demo.py exp/demo

# The installed pytest (not `python -m pytest`, which would put the source tree on sys.path).
test: $(BIN)/.installed
	$(BIN)/pytest tests -q -rs

# On a GPU machine whose python3 has torch (CUDA), DeepSpeed and this package: the checks only a GPU can
# run, then bench/gpu.py (bench/gpu_check.py says what each shows). Never part of `make test` or CI.
GPU_PYTHON ?= python3
gpu-check:
	env -u DS_ACCELERATOR -u OMP_NUM_THREADS $(GPU_PYTHON) bench/gpu_check.py

# For a GPU machine with torch (CUDA) that cannot reach PyPI: what it lacks (DeepSpeed's source package, the
# wheels of this package's and DeepSpeed's other needs, at .venv's versions) into .device/; there, from a copy
# of this checkout with .device/ in it, `bash bench/device_check.sh` installs them and runs the GPU proof.
device-bundle: $(BIN)/.installed
	VENV=$(VENV) bash bench/device_bundle.sh

# One venv per torch + DeepSpeed pair, the suite in each; writes docs/compatibility.md's table.
compat:
	.ci/compat

clean:
	rm -rf $(VENV) exp build $(WHEEL_DIR) .compat .device *.egg-info
