# Set-up and the two entry points of the README. Everything installs into .venv from the
# exact closures in requirements/*.lock (--no-deps: the lock is the whole resolution), except
# torch and torchvision (requirements/torch.txt), which pip resolves with their dependencies.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo finetune-demo test venv venv-test clean

$(VENV)/.runtime-stamp: requirements/runtime.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --no-deps -r requirements/runtime.lock
	$(PIP) install -q --no-deps -e .
	touch $@

$(VENV)/.test-stamp: $(VENV)/.runtime-stamp requirements/test.lock requirements/torch.txt
	$(PIP) install -q --no-deps -r requirements/test.lock
	$(PIP) install -q -r requirements/torch.txt
	touch $@

venv: $(VENV)/.runtime-stamp
venv-test: $(VENV)/.test-stamp

demo: venv
	$(PY) main.py --config=configs/hmpl.py:demo

# SAM 3 fine-tuned on the demo set's COCO export (README: "Fine-tune SAM 3 on your data").
finetune-demo: venv
	$(PY) main.py --config=configs/sam3_finetune.py:demo

# Two runs: the suite on 2 workers, then the tests marked `alone` (see pyproject.toml) by themselves.
test: venv-test
	$(PY) -m pytest -n 2 --dist loadgroup -ra --durations=25 -m "not alone"
	$(PY) -m pytest -ra --durations=5 -m alone

clean:
	rm -rf $(VENV)
