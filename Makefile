# `make train` runs the default job, `make test` the test suite; both install what they need first.
PYTHON ?= python3
STAMP := build/.installed

.PHONY: install train test test-slow bench clean

TRAIN_STAMP := build/.installed-train

# torch==2.13.0: on a CPU-only machine of this project's kind pip takes the CPU build kept on disk
# instead of downloading a multi-gigabyte CUDA build; an existing torch is left alone.
# `make train` installs what training needs (and matplotlib, for the run's curves.png); `make test` the dev
# extra too (transformers, datasets, the notebook runner: what the tests compare with and run).
$(TRAIN_STAMP): setup.py
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[plot]'
	@mkdir -p build && touch $(TRAIN_STAMP)

$(STAMP): setup.py
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[dev]'
	@mkdir -p build && touch $(STAMP) $(TRAIN_STAMP)

install: $(STAMP)

train: $(TRAIN_STAMP)
	$(PYTHON) scripts/train.py --config configs/tiny.py

# the versions a run tested, first in its log: the dev extra takes the newest the registry serves
VERSIONS := import importlib.metadata as m, platform; print('testing with python', platform.python_version(), \
	*(f'{n} {m.version(n)}' for n in ('torch', 'triton', 'transformers', 'numpy')))

test: $(STAMP)
	@$(PYTHON) -c "$(VERSIONS)"
	$(PYTHON) -m pytest -q -m "not slow" tests

# tests too slow for `make test`; .ci/run runs them after it
test-slow: $(STAMP)
	@$(PYTHON) -c "$(VERSIONS)"
	$(PYTHON) -m pytest -q -m slow tests; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

# benchmarks: the harness (GPU kernels and attention where there is a GPU; CPU memory and step time),
# then the CPU pytest-benchmark cases
bench: $(STAMP)
	$(PYTHON) bench/run.py --quick
	$(PYTHON) -m pytest bench/test_cpu.py --benchmark-only -q -p no:cacheprovider

clean:
	rm -rf build runs .pytest_cache
