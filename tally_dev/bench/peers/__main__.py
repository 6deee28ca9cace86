"""``python -m tally_dev.bench.peers pg|redis|bare --url URL --port PORT``: serve one lean peer.

granian with its RSGI interface, one worker process on uvloop, no access log: the lean server of
``peers.lean`` in front of the named store (``bare``: none).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from granian import Granian
from granian.constants import Interfaces, Loops
from granian.log import LogLevels


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tally_dev.bench.peers", description=__doc__)
    p.add_argument("kind", choices=["pg", "redis", "bare"])
    p.add_argument("--url", default="", help="PostgreSQL DSN or Redis URL")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pool", type=int, default=16, help="connections to the engine")
    args = p.parse_args(argv)
    os.environ.update(PEER_KIND=args.kind, PEER_URL=args.url, PEER_POOL=str(args.pool))
    Granian("tally_dev.bench.peers.lean:app_from_env", factory=True, address="127.0.0.1",
            port=args.port, interface=Interfaces.RSGI, workers=1, loop=Loops.uvloop,
            log_level=LogLevels.warning, log_access=False).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
