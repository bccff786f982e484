# The two commands a newcomer runs (see README.md):
#   make demo   set everything up, then run the main job on a SoftHSM token
#   make test   set everything up, then run the whole test suite
# Both are idempotent: finished steps are not redone.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STATE  := .state
EXTRAS := dev,postgres,server,fido2,piv,bus

# The SoftHSM container tests: podman with runc (crun fails on these hosts' cgroups),
# mmdebstrap to build the image from Debian packages; meson, ninja, pkg-config and
# libffi-dev build p11-kit 0.25.5 from Debian's source into .state (bookworm's 0.24
# cannot carry ECDH over its RPC); p11-kit-modules is bookworm's own 0.24 client, which
# a test drives to check that its ECDH refusal is typed.
CONTAINER_PACKAGES := podman runc mmdebstrap p11-kit p11-kit-modules \
	meson ninja-build pkg-config libffi-dev curl xz-utils
# pcscd + vsmartcard-vpcd: the virtual PIV card and the FIDO2 authenticator appear as
# real cards in PC/SC; gcc, python3-dev, swig, libpcsclite-dev build pyscard;
# ykcs11 and yubico-piv-tool cross-check the virtual card as independent clients;
# libengine-pkcs11-openssl lets stock OpenSSL sign through the HSM service's p11-kit RPC front.
SYSTEM_PACKAGES := softhsm2 opensc python3-venv ca-certificates postgresql \
	pcscd vsmartcard-vpcd libpcsclite-dev gcc python3-dev swig ykcs11 yubico-piv-tool \
	libengine-pkcs11-openssl \
	$(CONTAINER_PACKAGES)

.PHONY: setup system venv demo test fuzz container-image lint bench clean

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

# Three workers on two cores: most of the suite waits (fsync, servers, subprocesses),
# so a third worker fills the gaps. Whole modules, in collection order (tests/conftest.py
# puts the modules with slow tests first, so none starts last). PYTEST_WORKERS=0 runs
# the suite in one process.
PYTEST_WORKERS ?= 3
test: setup container-image
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25 \
		$(PYTEST_ARGS)

# Every parser of outside input, FUZZ_CASES generated and mutated inputs in all; prints
# the cases run per target (docs/fuzzing.md).  A short run is part of `make test`.
FUZZ_CASES ?= 100000
fuzz: setup
	$(PY) -m tests.fuzz.driver --cases $(FUZZ_CASES)

# The SoftHSM + p11-kit server image the container tests run (hardware/container/);
# built from Debian packages, with p11-kit 0.25.5 built from Debian's source (host client
# and container server), when missing or outdated; instant otherwise.
container-image: system
	@bash hardware/container/build-image.sh

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: setup
	@bash hardware/install-system-packages.sh wrk  # load generator of cloud_http.py
	for b in pkcs11_provider pkcs11_remote piv_provider capabilities ledger didcomm cloud_http \
		ratchet delivery merkle directory sync groups hsm_service hsm_p11kit event_bus \
		revocation_propagation; do \
		test ! -f benchmarks/$$b.py || $(PY) benchmarks/$$b.py || exit 1; \
	done

clean:
	rm -rf $(STATE) build *.egg-info
