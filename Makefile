# madoguchi: `make demo` and `make test` do all set-up on a fresh Debian 12 /
# Raspberry Pi OS machine. System packages are installed with apt when run as
# root (otherwise they are listed for you), then a .venv with an editable install.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Everything the agent, the demo and the tests need from Debian.
APT_PACKAGES := mosquitto mosquitto-clients pcscd libccid vsmartcard-vpcd libpcsclite-dev swig \
                python3-venv python3-dev gcc linux-libc-dev systemd shellcheck chromium \
                fonts-ipafont-gothic postgresql rabbitmq-server
EXTRAS := dev
# What a station needs from Debian: the above minus what only development and the
# tests use (the brokers, the virtual card reader, linters, the central database).
DEV_ONLY_APT := mosquitto vsmartcard-vpcd systemd shellcheck postgresql rabbitmq-server
STATION_APT_PACKAGES := $(filter-out $(DEV_ONLY_APT),$(APT_PACKAGES))
# `make bundle BUNDLE_PLATFORMS=x86_64` for one platform only.
BUNDLE_PLATFORMS ?= aarch64,armv7l,x86_64

.PHONY: setup system-packages venv demo test lint typecheck bench bundle print-station-packages clean fuzz

setup: system-packages venv

system-packages:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing system packages: $$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	else \
	  echo "missing system packages (install as root: apt-get install $$missing)"; \
	  command -v mosquitto >/dev/null || test -x /usr/sbin/mosquitto || exit 1; \
	fi

venv: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

demo: setup
	$(BIN)/madoguchi demo

lint: venv
	$(BIN)/ruff check agent tests bench
	$(BIN)/ruff format --check agent tests bench
	$(BIN)/lint-imports --no-cache

typecheck: venv
	$(BIN)/mypy agent

test: setup lint typecheck
	$(BIN)/python -m pytest -q

# Every parser of outside input with FUZZ_EXAMPLES inputs each (tests/fuzz/): fails on an
# undocumented exception or an input over 100 ms of CPU. `make test` runs them with 60
# each. Measured on the shared 2-core dev machine: 20,000 each in 395 s, so 200,000 each
# should take about an hour (not yet run at that count).
FUZZ_EXAMPLES ?= 200000
fuzz: venv
	MADOGUCHI_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q \
	  -o addopts="--strict-markers -ra" --timeout=0 tests/fuzz

# Every figure of docs/PERFORMANCE.md from this one run: bench/run.py writes the report
# and results.json, the others their JSON beside it, and the last step writes the report
# again with issue #18's targets judged from all of them (bench/report.py).
BENCH_SIDE := $(foreach b,drain_cpu registry wan peer,docs/perf/$(b).json)
bench: setup
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS),bench]'
	rm -f $(BENCH_SIDE)
	$(BIN)/python bench/run.py
	$(BIN)/python bench/bench_drain_cpu.py --backlog 10000,100000,1000000 \
	  --plot docs/perf/drain_backlog.png --json docs/perf/drain_cpu.json \
	  $(if $(BENCH_BASE),--base $(BENCH_BASE))
	$(BIN)/python bench/bench_registry.py --json docs/perf/registry.json
	$(BIN)/python bench/bench_wan.py --json docs/perf/wan.json
	$(BIN)/python bench/bench_peer.py --json docs/perf/peer.json
	$(BIN)/python bench/bench_cluster.py
	$(BIN)/python bench/bench_datasets.py 1000000
	$(BIN)/python bench/run.py --report-only

# The offline bundle (docs/provisioning.md): dist/madoguchi-bundle-VERSION.tar.gz
bundle: venv
	$(BIN)/python provisioning/bundle.py --platforms '$(BUNDLE_PLATFORMS)' --out dist \
	  --debian-packages '$(STATION_APT_PACKAGES)'

print-station-packages:
	@echo $(STATION_APT_PACKAGES)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
