# Tally: `make run` starts the service on the embedded default; `make test` runs the suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: run test check fmt bench chaos chaos-storage chaos-regions chaos-reshard engines clean

$(STAMP): pyproject.toml
	PYTHON=$(PYTHON) scripts/ensure-python.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[scale,bench,dev,ha]'
	# Patroni runs as the unprivileged PostgreSQL user, which cannot reach an interpreter under
	# /root: a second virtualenv on the system Python holds the `ha` extra for it.
	if [ "$$(id -u)" = 0 ] && [ -x /usr/bin/python3 ]; then \
	  test -x .venv-ha/bin/python || /usr/bin/python3 -m venv .venv-ha; \
	  $(BIN)/python scripts/extra-pins.py ha | xargs .venv-ha/bin/pip install -q; \
	fi
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/tally serve

engines:
	scripts/ensure-engines.sh

check: $(STAMP)
	$(BIN)/ruff check tally tally_dev tests
	$(BIN)/mypy
	$(BIN)/lint-imports --no-logo

fmt: $(STAMP)
	$(BIN)/ruff check --fix tally tally_dev tests

# The suite spends most of its time waiting (engines starting, failovers, kills), not computing:
# TEST_WORKERS pytest processes share it, each test started as a process frees up.
TEST_WORKERS ?= 3

test: $(STAMP) engines check
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist worksteal

# The chaos scenarios on the HA dev cluster, each under a client ledger (docs/reliability.md).
chaos: $(STAMP) engines chaos-storage chaos-regions chaos-reshard
	timeout 1200 $(BIN)/tally chaos --out chaos-results.json

# Storage faults on the FUSE filesystem of tally_dev/faultfs (docs/storage-faults.md): up to 50
# power-loss rounds per SQLite durability profile, per PostgreSQL synchronous_commit and per
# JetStream sync interval (10 minutes each at most), 25 of the whole cluster (25 minutes at most),
# 10 of Redis alone per appendfsync, a failed fsync, a full disk, the controls. One JSON line per
# result in chaos-storage.jsonl.
CHAOS_ROUNDS ?= 50
chaos-storage: $(STAMP) engines
	TALLY_CHAOS_ROUNDS=$(CHAOS_ROUNDS) TALLY_CHAOS_SECONDS=600 \
	TALLY_CHAOS_PROFILES=full,extra,normal TALLY_CHAOS_PG_PROFILES=on,off \
	TALLY_CHAOS_NATS_PROFILES=always,2m \
	TALLY_CHAOS_CLUSTER_ROUNDS=25 TALLY_CHAOS_CLUSTER_SECONDS=1500 \
	TALLY_CHAOS_REDIS_PROFILES=everysec TALLY_CHAOS_REDIS_CUT=everysec,always \
	TALLY_CHAOS_REDIS_ROUNDS=10 \
	TALLY_FAULTS_REPORT=chaos-storage.jsonl \
	timeout 7200 $(BIN)/pytest -q -s -p no:cacheprovider -o timeout=1800 tests/faults

# Two regions in network namespaces under a client ledger (docs/regions.md): load with
# forwarding and the cross-region visibility probe, a partition and heal, a region SIGKILLed under
# load, a failover and rejoin with a staged conflict. Needs root (ip netns). Results in
# chaos-regions.json; exits non-zero if any count differs from the ledger. Then automatic failover
# through the witness quorum (no majority, a cut, a kill; the no-op and late-views rejoin cases)
# and three regions with the leaf-node hub in the witness place (a leaf killed, failed over and
# rejoined, a cut, us lost with replication between eu and ap going on, the hub lost and back):
# chaos-failover.json, non-zero on a count off the ledger or a pair decided twice in one epoch.
# Then replication = "sync" (likes) beside async (saves) through a region lost with its disks, in
# two regions and in three: chaos-regions-sync.json and chaos-regions-sync3.json, non-zero on a like lost or a count off the ledger less the listed
# losses; and the cross-region visibility probe under load with its per-stage breakdown.
chaos-regions: $(STAMP) engines
	timeout 1200 $(BIN)/python -m tally_dev.regions_chaos --out chaos-regions.json
	timeout 1200 $(BIN)/python -m tally_dev.regions_failover --out chaos-failover.json
	timeout 1200 $(BIN)/python -m tally_dev.regions_sync --out chaos-regions-sync.json
	timeout 1200 $(BIN)/python -m tally_dev.regions_sync --regions 3 --out chaos-regions-sync3.json
	timeout 900 $(BIN)/python -m tally_dev.regions_visibility --out chaos-regions-visibility.json

# Online resharding on the dev cluster under a client ledger (docs/scale-out.md): three
# `tally shards move` runs mid-load (off database 0, onto it, and back); each move's write pause and
# the clients' 503s and retried writes; every acknowledged state read back, counts against the
# ledger and the server's recount. Results in chaos-reshard.json; non-zero exit on any loss.
chaos-reshard: $(STAMP) engines
	timeout 900 $(BIN)/python -m tally_dev.reshard_chaos --out chaos-reshard.json

bench: $(STAMP) engines
	$(BIN)/tally bench suite --out bench-results

clean:
	rm -rf $(VENV) .venv-ha data .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
