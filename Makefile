# Set-up and the entry points of the README (demo, app, test). Everything installs into .venv from the
# exact closures in requirements/*.lock (--no-deps: the lock is the whole resolution), except
# torch and torchvision (requirements/torch.txt), which pip resolves with their dependencies.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo finetune-demo app test venv venv-app venv-test browser clean

$(VENV)/.runtime-stamp: requirements/runtime.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --no-deps -r requirements/runtime.lock
	$(PIP) install -q --no-deps -e .
	touch $@

$(VENV)/.app-stamp: $(VENV)/.runtime-stamp requirements/app.lock
	$(PIP) install -q --no-deps -r requirements/app.lock
	touch $@

$(VENV)/.test-stamp: $(VENV)/.app-stamp requirements/test.lock requirements/torch.txt
	$(PIP) install -q --no-deps -r requirements/test.lock
	$(PIP) install -q -r requirements/torch.txt
	touch $@

venv: $(VENV)/.runtime-stamp
venv-app: $(VENV)/.app-stamp
venv-test: $(VENV)/.test-stamp

demo: venv
	$(PY) main.py --config=configs/hmpl.py:demo

# SAM 3 fine-tuned on the demo set's COCO export (docs/finetuning.md).
finetune-demo: venv
	$(PY) main.py --config=configs/sam3_finetune.py:demo

# The web demo on the demo's tiny model: http://127.0.0.1:7860 (ARGS="--model DIR --port N").
app: venv-app
	$(PY) -m sam3i_jax.app $(ARGS)

# The browser test (tests/test_app.py) drives Debian's chromium through chromedriver; installed
# here as root (as on CI), otherwise the test is skipped with a note.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	else echo "chromium/chromedriver missing and not root: the browser test will be skipped"; fi

# Two runs: the suite on 2 workers, then the tests marked `alone` (see pyproject.toml) by themselves.
test: venv-test browser
	$(PY) -m pytest -n 2 --dist loadgroup -ra --durations=25 -m "not alone"
	$(PY) -m pytest -ra --durations=5 -m alone

clean:
	rm -rf $(VENV)
