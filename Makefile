# vitpool: `make test` installs into .venv and runs the tests; `make demo` converts, counts and evaluates
# the real DeiT-Tiny in ../shared/data, offline.
PYTHON ?= python3
VENV ?= .venv
# The torch to install first; the rest is installed with torch pinned to it, so no other torch is pulled in.
# On a machine with the model hub and any torch build: make install TORCH=torch
TORCH ?= torch==2.13.0
# make demo's real data: a DeiT-Tiny checkpoint and a folder of class folders named by WordNet id
DATA ?= ../shared/data
WEIGHTS ?= $(DATA)/weights/deit_tiny_patch16_224.pth
IMAGES ?= $(DATA)/imagenet-sample
BIN := $(VENV)/bin
DEMO_OUT ?= runs/deit_tiny_pooled

# The lowest timm pyproject.toml allows, and the tests that exercise what vitpool uses of timm.
LOWEST_TIMM := $(shell sed -n 's/.*"timm>=\([0-9.]*\).*/\1/p' pyproject.toml)
TIMM_TESTS := tests/test_adapter.py tests/test_tome.py tests/test_finetune.py

.PHONY: install test test-lowest demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip freeze | grep -i '^torch==' > $(VENV)/constraints.txt
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e '.[test,data]'
	$(BIN)/python -c 'import vitpool._torchvision_compat as c; c.main()'
	touch $@

# Two pytest workers of one thread each: many tests start a fresh interpreter (the CLI), which one worker would
# wait on alone. loadgroup: tests marked with one xdist_group run on one worker, and share what it traced once.
TEST_WORKERS ?= 2

test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

# timm at its lower bound, installed beside the venv's (PYTHONPATH puts it first, subprocesses included)
test-lowest: install
	rm -rf $(VENV)/lowest-timm
	$(BIN)/pip install -q --no-deps --target $(VENV)/lowest-timm "timm==$(LOWEST_TIMM)"
	PYTHONPATH=$(VENV)/lowest-timm $(BIN)/python -c "import timm; assert timm.__version__ == '$(LOWEST_TIMM)', timm.__version__"
	PYTHONPATH=$(VENV)/lowest-timm $(BIN)/python -m pytest -q -p no:cacheprovider $(TIMM_TESTS)

demo: install
	$(BIN)/vitpool convert deit_tiny --checkpoint $(WEIGHTS) --budget 0.6 --out $(DEMO_OUT) --force
	$(BIN)/vitpool flops $(DEMO_OUT)
	$(BIN)/vitpool eval $(DEMO_OUT) --data $(IMAGES)

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
