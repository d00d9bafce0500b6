# vitpool: `make test` installs into .venv and runs the tests; `make demo` converts, counts and evaluates
# the real DeiT-Tiny in ../shared/data, offline.
PYTHON ?= python3
VENV ?= .venv
# The torch to install first; the rest is installed with torch pinned to it, so no other torch is pulled in.
# On a machine with the model hub and any torch build: make install TORCH=torch
TORCH ?= torch==2.13.0
DATA ?= ../shared/data
BIN := $(VENV)/bin
DEMO_OUT ?= runs/deit_tiny_pooled

.PHONY: install test demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip freeze | grep -i '^torch==' > $(VENV)/constraints.txt
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e '.[test]'
	touch $@

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/vitpool convert deit_tiny --checkpoint $(DATA)/weights/deit_tiny_patch16_224.pth \
		--budget 0.6 --out $(DEMO_OUT) --force
	$(BIN)/vitpool flops $(DEMO_OUT)
	$(BIN)/vitpool eval $(DEMO_OUT) --data $(DATA)/imagenet-sample

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
