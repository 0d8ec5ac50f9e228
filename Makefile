# Everyday entry points. `bootstrap`, `demo` and `test` need root (packages, kernel
# headers, cgroups, eBPF); `unit` and `lint` do not, once .venv exists.
.PHONY: bootstrap bench demo test test-vm unit lint clean distclean

VENV_PY := .venv/bin/python
# Extra pytest arguments, e.g. `make test ARGS="-x -k mysql"`.
ARGS ?=

bootstrap:
	bash scripts/bootstrap.sh

# Every benchmark in bench/ in turn (root, in the lab; each prints its figure, its
# baseline and the ratio, and exits 0). The bootstrap's bench extra brings dnsperf and
# dnsmasq.
bench:
	bash scripts/bootstrap.sh --bench
	@status=0; for b in bench/bench_*.py; do echo "== $$b"; $(VENV_PY) $$b || status=1; done; \
	exit $$status

demo: bootstrap
	$(VENV_PY) examples/demo.py

# The privileged suite in the lab; --depfence-require fails instead of skipping when a
# fence cannot be built, so a broken machine cannot pass silently.
test: bootstrap
	$(VENV_PY) -m pytest --depfence-lab --depfence-require $(ARGS)

# The integration suite again in QEMU on a Debian release's own kernel and bcc:
# DISTRO=bullseye (11: kernel 5.10, bcc 0.18), bookworm (12: 6.1, bcc 0.26, the default)
# or trixie (13: 6.12). Root; the first run of each builds its VM image (~4 min, cached in
# /var/cache/depfence-vm). VM_ARGS="--suite kernel" runs the faster subset.
DISTRO ?= bookworm
VM_ARGS ?=
test-vm:
	bash scripts/vm-lane.sh --distro $(DISTRO) $(VM_ARGS) $(if $(ARGS),-- $(ARGS))

unit: $(VENV_PY)
	$(VENV_PY) -m pytest tests/unit tests/plugin $(ARGS)

lint: $(VENV_PY)
	.venv/bin/ruff check .
	.venv/bin/mypy pytest_depfence

$(VENV_PY):
	@echo "no .venv yet: run 'sudo make bootstrap' first" >&2
	@exit 1

clean:
	rm -rf build dist .tox .mypy_cache .ruff_cache .pytest_cache *.egg-info
	rm -f vm-junit*.xml vm-console*.log
	find . -path ./.venv -prune -o -type d -name __pycache__ -exec rm -rf {} +

# Also drop the virtualenv (the next bootstrap recreates it).
distclean: clean
	rm -rf .venv .vagrant
