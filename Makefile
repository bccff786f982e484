# The two commands a newcomer runs (see README.md):
#   make demo   set everything up, then run the main job on a SoftHSM token
#   make test   set everything up, then run the whole test suite
# Both are idempotent: finished steps are not redone.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STATE  := .state
EXTRAS := dev,postgres,server,fido2,piv

# pcscd + vsmartcard-vpcd: the virtual PIV card and the FIDO2 authenticator appear as
# real cards in PC/SC; gcc, python3-dev, swig, libpcsclite-dev build pyscard;
# ykcs11 and yubico-piv-tool cross-check the virtual card as independent clients.
SYSTEM_PACKAGES := softhsm2 opensc python3-venv ca-certificates postgresql \
	pcscd vsmartcard-vpcd libpcsclite-dev gcc python3-dev swig ykcs11 yubico-piv-tool

.PHONY: setup system venv demo test lint bench clean

setup: system venv

system:
	@bash hardware/install-system-packages.sh $(SYSTEM_PACKAGES)

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]' --config-settings editable_mode=compat
	@touch $@

demo: setup
	$(PY) -m agent.demo --state-dir $(STATE)/demo

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: setup
	@bash hardware/install-system-packages.sh wrk  # load generator of cloud_http.py
	for b in pkcs11_provider piv_provider capabilities ledger didcomm cloud_http; do \
		test ! -f benchmarks/$$b.py || $(PY) benchmarks/$$b.py || exit 1; \
	done

clean:
	rm -rf $(STATE) build *.egg-info
