# `make test` and `make demo` work on a fresh machine with only Python 3.11:
# they create .venv, install the pinned requirements, build the extension, then run.
# Stamps make a second run with nothing changed skip the install and the build.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
DEPS_STAMP  := $(VENV)/.deps-stamp
BUILD_STAMP := $(VENV)/.build-stamp
BENCH_STAMP := $(VENV)/.bench-deps-stamp
CMAKE_DIR   := build-cmake

# torch guesses CUDA_HOME=/usr/local from /usr/local/bin/nvcc and then fails to link
# -lcudart; point it at the real toolkit when there is one.
ifeq ($(origin CUDA_HOME), undefined)
  ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
    export CUDA_HOME := /usr/local/cuda
  endif
endif

CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)

.PHONY: all test demo bench cmake-check clean venv deps build

all: build

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): requirements.txt | $(PY)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements.txt
	touch $@

$(BUILD_STAMP): $(DEPS_STAMP) $(CSRC) setup.py pyproject.toml
	MAX_JOBS=$${MAX_JOBS:-2} $(PIP) install --quiet --no-build-isolation --no-deps -e .
	touch $@

# The benchmark extra beyond requirements.txt (pyproject's [bench]): ONNX Runtime
# for the suite's ONNX Runtime columns, which skip with a reason without it.
$(BENCH_STAMP): $(DEPS_STAMP)
	$(PIP) install --quiet onnxruntime==1.32.0 onnx==1.23.2
	touch $@

venv: $(PY)
deps: $(DEPS_STAMP)
build: $(BUILD_STAMP)

test: $(BUILD_STAMP)
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

demo: $(BUILD_STAMP)
	$(VENV)/bin/tucker-ops demo

bench: $(BUILD_STAMP) $(BENCH_STAMP)
	$(PY) benchmarks/run.py $(BENCH_ARGS)

# Builds csrc/ a second way, with CMake and find_package(Torch), and loads the result
# with torch.ops.load_library, so that the CMake route cannot rot.
cmake-check: $(DEPS_STAMP)
	TORCH_PREFIX=$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)'); \
	SITE=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	EXTRA=""; \
	if [ -n "$$CUDA_HOME" ] && $(PY) -c 'import sys, torch; sys.exit(torch.version.cuda is None)'; then \
	  EXTRA="-DCUDA_TOOLKIT_ROOT_DIR=$$CUDA_HOME -DCUDAToolkit_ROOT=$$CUDA_HOME -DCUDA_nvrtc_LIBRARY=$$SITE/nvidia/cu13/lib/libnvrtc.so.13"; \
	fi; \
	TORCH_CUDA_ARCH_LIST="$${TORCH_CUDA_ARCH_LIST:-8.0;9.0}" cmake -S . -B $(CMAKE_DIR) -G Ninja -DCMAKE_MAKE_PROGRAM=$(CURDIR)/$(VENV)/bin/ninja -DCMAKE_BUILD_TYPE=Release \
	      -DCMAKE_PREFIX_PATH="$$TORCH_PREFIX" -DPython3_EXECUTABLE=$(CURDIR)/$(PY) $$EXTRA && \
	cmake --build $(CMAKE_DIR) -j 2
	$(PY) .ci/cmake_smoke.py $(CMAKE_DIR)/libtucker_ops.so

clean:
	rm -rf build $(CMAKE_DIR) *.egg-info tucker_ops/_C*.so $(BUILD_STAMP)
