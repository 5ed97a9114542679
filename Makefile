# The appliance's entry points. Each target sets up what it needs (idempotently) first.
#   make run     run the appliance with config/appliance.yaml (DICOM on 11112, data in ./var/)
#   make test    install the test peers (Debian's dcmtk, orthanc, ghostscript, cups), lint, run pytest
#   make bench   speed and memory as ratios against real peers in the same run
#   make lint    ruff + mypy

PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
STAMPS  := .stamps
CONFIG  ?= config/appliance.yaml
PYTEST_ARGS ?=

# Debian packages. systemd-python is built from PyPI against libsystemd (hence libsystemd-dev and
# pkg-config); the venv itself needs python3-venv on a stock Debian.
APT_BUILD := libsystemd-dev pkg-config python3-venv python3-dev gcc
APT_TEST  := dcmtk orthanc ghostscript cups cups-client cups-bsd time iproute2 util-linux procps

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# apt-install PKGS: install the packages that are missing (no-op when all are there).
define apt-install
	@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing </dev/null; \
	fi
endef

.PHONY: run test test-slow bench lint clean setup
.DEFAULT_GOAL := run

$(STAMPS)/apt-build:
	$(call apt-install,$(APT_BUILD))
	@mkdir -p $(STAMPS) && touch $@

$(STAMPS)/apt-test:
	$(call apt-install,$(APT_TEST))
	@mkdir -p $(STAMPS) && touch $@

$(STAMPS)/venv: pyproject.toml $(STAMPS)/apt-build
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

setup: $(STAMPS)/venv

run: $(STAMPS)/venv
	mkdir -p var
	exec $(PY) -m appliance run --config $(CONFIG)

lint: $(STAMPS)/venv
	$(VENV)/bin/ruff check appliance tests
	$(VENV)/bin/mypy appliance

test: $(STAMPS)/venv $(STAMPS)/apt-test lint
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: $(STAMPS)/venv $(STAMPS)/apt-test
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

bench: $(STAMPS)/venv $(STAMPS)/apt-test
	$(PY) -m pytest -m bench -s $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(STAMPS) var .pytest_cache .mypy_cache .ruff_cache
