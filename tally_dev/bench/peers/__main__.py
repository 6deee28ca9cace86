"""``python -m tally_dev.bench.peers pg|redis --url URL --port PORT``: serve one peer over HTTP.

Run with the same uvicorn settings as ``tally serve`` (uvloop, httptools, no access log).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import uvicorn

from tally_dev.bench.peers.app import PeerStore, peer_app


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tally_dev.bench.peers", description=__doc__)
    p.add_argument("kind", choices=["pg", "redis"])
    p.add_argument("--url", required=True, help="PostgreSQL DSN or Redis URL")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pool", type=int, default=16, help="connections to the engine")
    args = p.parse_args(argv)
    store: PeerStore
    if args.kind == "pg":
        from tally_dev.bench.peers.pg import PostgresPeer

        store = PostgresPeer(args.url, args.pool)
    else:
        from tally_dev.bench.peers.redis import RedisPeer

        store = RedisPeer(args.url, args.pool)
    logging.basicConfig(level=logging.WARNING)
    uvicorn.run(peer_app(store), host="127.0.0.1", port=args.port, loop="uvloop", http="httptools",
                log_config=None, access_log=False, timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
