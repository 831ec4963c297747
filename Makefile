# Two entry points for a fresh machine: `make up` (the quickstart) and `make test` (the whole suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: up test lint install system-deps bench

$(BIN)/legation: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --ignore-requires-python -e '.[test]'
	touch $(BIN)/legation

install: $(BIN)/legation

# redis-server for the Redis backend tests, wrk/h2load for bench/, docker-compose to validate compose/,
# clang + libbpf-dev + bpftool to build and load the --ebpf programs (legation/capture/ebpf/).
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v wrk >/dev/null || missing="$$missing wrk"; \
	command -v h2load >/dev/null || missing="$$missing nghttp2-client"; \
	command -v docker-compose >/dev/null || missing="$$missing docker-compose"; \
	command -v clang >/dev/null || missing="$$missing clang"; \
	[ -f /usr/include/bpf/bpf_helpers.h ] || missing="$$missing libbpf-dev"; \
	command -v bpftool >/dev/null || [ -x /usr/sbin/bpftool ] || missing="$$missing bpftool"; \
	command -v ip >/dev/null || [ -x /usr/sbin/ip ] || missing="$$missing iproute2"; \
	command -v iptables-restore >/dev/null || [ -x /usr/sbin/iptables-restore ] || missing="$$missing iptables"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing >/dev/null; \
	fi

up: install
	$(BIN)/legation up

# style and types first (fast), then the whole suite
lint: install
	$(BIN)/ruff check legation tests bench examples compose
	$(BIN)/ruff format --check legation tests bench examples compose
	$(BIN)/mypy legation

test: install system-deps lint
	$(BIN)/pytest -q

bench: install system-deps
	$(BIN)/python -m bench
