# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev,gpu,jpeg,tokenizers,ray,plot

.PHONY: demo test bench clean object-store

# The demo needs stoker's core dependencies only; the tests also need every extra (DALI, Ray, ...).
$(VENV)/.core: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch (a local wheel on this project's machines); a plain `torch` would pull the CUDA build.
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q "torch>=2.1"
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed: $(VENV)/.core
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

demo: $(VENV)/.core
	$(VENV)/bin/stoker demo
	@echo "stoker and pack-dataset are in $(VENV)/bin: run 'source $(VENV)/bin/activate' to put them on PATH"

# The loopback object store of the remote tests and benchmarks (stoker/testing.py): Debian's nginx with
# its echo module, and openssl for its https certificate, installed when missing (CI runs as root on a fresh Debian
# machine; elsewhere through sudo).
NGINX_PACKAGES := nginx-light libnginx-mod-http-echo openssl
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
object-store:
	@test -x /usr/sbin/nginx -a -f /usr/lib/nginx/modules/ngx_http_echo_module.so -a -x /usr/bin/openssl || \
		($(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(NGINX_PACKAGES))

test: $(VENV)/.installed object-store
	$(VENV)/bin/pytest -q

bench: $(VENV)/.installed object-store
	$(PY) benchmarks/run_all.py   # every benchmark (peers.py too when .venv-bench exists: docs/bench.md)

clean:
	rm -rf $(VENV) demo-data
