# Two commands set everything up on a fresh machine: `make test` and `make demo`.
# Both create .venv if missing and reinstall only when pyproject.toml changed.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev
PYTEST_ARGS ?=

.PHONY: test demo lint install clean soak orders orders-chaos servers

test: $(STAMP) servers
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The servers and tools the tests start, from Debian's packages: Redis (shared breaker state),
# Prometheus and promtool (tests/test_operations.py), kcat. Installed when missing (apt-get;
# through sudo unless root); a missing one fails the tests, never skips them.
servers:
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 \
		|| missing="$$missing prometheus"; \
	command -v kcat >/dev/null 2>&1 || missing="$$missing kcat"; \
	if [ -n "$$missing" ]; then \
		sudo=""; [ "$$(id -u)" -ne 0 ] && sudo="sudo"; \
		echo "installing Debian packages:$$missing"; \
		$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq \
			--no-install-recommends $$missing >/dev/null \
			|| { echo "could not install$$missing (Debian packages)" >&2; exit 1; }; \
	fi

demo: $(STAMP)
	$(BIN)/resilient-kafka demo

# The chaos suite's long profile: every built-in scenario at 10,000 messages (about 35 min; not
# in CI). Report in soak-report/ (docs/reliability.md).
soak: $(STAMP)
	$(BIN)/resilient-kafka chaos run --profile long --report soak-report

# The order system example (examples/orders/README.md): the whole system with a live view, and
# its chaos run (every service killed once, gateway down, broker killed, network latency).
orders: $(STAMP)
	$(BIN)/python -m examples.orders up

orders-chaos: $(STAMP)
	$(BIN)/python -m examples.orders chaos full --workdir orders-chaos-report

lint: $(STAMP)
	$(BIN)/ruff check resilient_kafka tests benchmarks examples
	$(BIN)/ruff format --check resilient_kafka tests benchmarks examples
	$(BIN)/mypy

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "resilient-kafka needs Python >= 3.11; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
