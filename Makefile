# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install browser clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# A small REIR (resnet18 shared, 48 heads x 12 meta classes, 32 px, random init) on the embedded glyphs,
# on the CPU, next to raw pixels and the untrained network (reir/cli/demo.py).
demo: $(STAMP)
	$(PY) -m reir.cli.demo --output_dir demo_output

# Headless Chromium and its driver for the browser tests, from Debian's packages (skipped when present).
# Without apt-get or root the browser tests are skipped and say what to install; with CI=true they fail.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	if command -v apt-get >/dev/null && { [ "$$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then \
		$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	elif [ "$$CI" = true ]; then echo "make browser: no apt-get or no root to install chromium and chromedriver" >&2; exit 1; \
	else echo "make browser: no apt-get or no root; the browser tests will be skipped (install chromium and chromedriver to run them)"; fi

# One test per core (pytest-xdist; an idle worker takes queued tests from a busy one); the slowest
# tests are listed so the suite's time stays visible. BROWSER=0 installs no browser and skips the
# browser tests (outside CI, where they always run).
BROWSER ?= 1
test: $(STAMP) $(if $(filter 0,$(BROWSER)),,browser)
	REIR_BROWSER=$(BROWSER) $(PY) -m pytest -q -n auto --dist worksteal --durations=15

clean:
	rm -rf $(VENV) demo_output
