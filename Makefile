# `make test` on a fresh Debian 12 machine with Python 3.11 installs whatever
# is missing (Debian packages, then a .venv) and runs the test suite.

PYTHON ?= python3
VENV := .venv
# Inside the venv, so that deleting .venv also forgets that it was set up.
STAMP := $(VENV)/.sslshare-installed
TESTS ?= tests
TRIAL_ARGS ?=

# The tests drive stock clients (openssl s_client, curl) and start their own
# redis-server, PostgreSQL and HAProxy (a backend that reads the PROXY
# protocol); CI has them all so that nothing is skipped.
APT_PACKAGES := openssl curl redis-server postgresql haproxy
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: test test-quick venv system-deps demo bench tlsfuzzer clean

# The tests, then mypy over the whole package (settings: [tool.mypy] in
# pyproject.toml).
test: system-deps venv
	$(VENV)/bin/python -m twisted.trial $(TRIAL_ARGS) $(TESTS)
	$(VENV)/bin/python -m mypy

# Every test module but the slow ones tests/support/suite.py names, two
# trial workers at a time: under a minute on two cores.
test-quick: system-deps venv
	$(VENV)/bin/python -m twisted.trial -j2 $(TRIAL_ARGS) \
	    $$($(VENV)/bin/python -m tests.support.suite quick)

venv: $(STAMP)

# Order-only: Debian's python3 needs python3-venv (from system-deps) to make a
# venv, but a venv that exists is not remade each time system-deps runs.
$(VENV)/bin/python: | system-deps
	$(PYTHON) -m venv $(VENV)

# setuptools too: the tests build the wheel with the venv's own
# (pyproject.toml's build-system), offline.
$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install --upgrade pip setuptools
	$(VENV)/bin/python -m pip install -e '.[test,postgres,redis]'
	touch $@

# Checks first, so that a machine that has everything never touches apt.
system-deps:
	@missing=""; \
	for pkg in $(APT_PACKAGES); do \
	    dpkg-query -W -f='$${Status}' $$pkg 2>/dev/null | grep -q 'install ok installed' \
	        || missing="$$missing $$pkg"; \
	done; \
	[ -x $(VENV)/bin/python ] || $(PYTHON) -c 'import ensurepip' 2>/dev/null \
	    || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    $(SUDO) apt-get update \
	    && $(SUDO) env DEBIAN_FRONTEND=noninteractive \
	        apt-get install -y --no-install-recommends $$missing; \
	fi

# Makes demo/pki on first use, writes demo/conf/ from sslshare/examples/,
# then runs three twistd nodes from it.
demo: system-deps venv
	$(VENV)/bin/sslshare demo

# Quick by default (about 13 minutes); `make bench BENCH_ARGS=` for the
# full run (under twenty).  Writes benchmarks/RESULTS.md and results.json.
BENCH_ARGS ?= --quick
# The references the benchmarks set sslshare beside: system-deps, run for
# bench, installs them too.
BENCH_PACKAGES := nginx
bench: APT_PACKAGES += $(BENCH_PACKAGES)
bench: system-deps venv
	$(VENV)/bin/python benchmarks/run.py $(BENCH_ARGS)

# tlsfuzzer is not on PyPI: TLSFUZZER names a checkout, TLSFUZZER_PYTHON a
# Python with its requirements (README.rst, "tlsfuzzer").
TLSFUZZER_PYTHON ?= $(VENV)/bin/python
tlsfuzzer: venv
	@test -n "$(TLSFUZZER)" || { echo "usage: make tlsfuzzer TLSFUZZER=<tlsfuzzer checkout> [TLSFUZZER_PYTHON=<python with tlslite-ng>]"; exit 2; }
	$(VENV)/bin/python benchmarks/tlsfuzzer.py $(TLSFUZZER) --python $(TLSFUZZER_PYTHON)

clean:
	rm -rf _trial_temp* build dist *.egg-info twisted/plugins/dropin.cache .ci/test.log .mypy_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
