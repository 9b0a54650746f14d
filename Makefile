# Two entry points: `make demo` and `make test`. Both install first; a second run reuses the install.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
APT_DEPS := pkg-config libopencv-dev libturbojpeg0-dev

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@pkg-config --exists opencv4 libturbojpeg 2>/dev/null || { \
	  echo "installing FFCV build dependencies: $(APT_DEPS)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $(APT_DEPS); }
	@command -v $(PY) >/dev/null || { echo "error: $(PY) not found; set PY=/path/to/python3.11"; exit 2; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: install
	$(BIN)/hakd run

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/hakd bench --results infra/bench/results all && $(BIN)/python -m infra.bench.table infra/bench/results

clean:
	rm -rf $(VENV) runs
