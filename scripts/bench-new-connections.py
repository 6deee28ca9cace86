"""How long new connections wait for their first answer: opens N connections to a Tally server
at once, sends one feed request on each (counts and has-liked of 50 random items), and prints
the first answers' times. Run it while another client keeps the server busy (e.g. ``wrk -t1
-c64 -d8s -s scripts/wrk/feed.lua URL``) to see what a burst of new clients meets under load.

    .venv/bin/python scripts/bench-new-connections.py --port 8000 --connections 64
"""

from __future__ import annotations

import argparse
import json
import random
import selectors
import socket
import time


def feed_request(path: str) -> bytes:
    body = json.dumps({"counters": ["like"], "user_id": random.randint(1, 10**9),
                       "items": [{"item_type": "post", "item_id": random.randint(1, 10**7)}
                                 for _ in range(50)]}).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: tally\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--path", default="/v1/counts")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for answers")
    args = p.parse_args()
    clients = []
    for _ in range(args.connections):  # connected first: the handshakes are the kernel's
        try:
            client = socket.create_connection((args.host, args.port), timeout=args.timeout)
        except OSError as exc:
            raise SystemExit(f"cannot connect to {args.host}:{args.port}: {exc}") from exc
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        clients.append(client)
    requests = [feed_request(args.path) for _ in clients]
    start = time.perf_counter()
    for client, request in zip(clients, requests, strict=True):
        client.sendall(request)
    waiting = selectors.DefaultSelector()
    for n, client in enumerate(clients):
        client.setblocking(False)
        waiting.register(client, selectors.EVENT_READ, n)
    received = {n: b"" for n in range(len(clients))}
    answered: dict[int, float] = {}
    while len(answered) < len(clients) and time.perf_counter() - start < args.timeout:
        for key, _ in waiting.select(timeout=0.5):
            n = key.data
            received[n] += key.fileobj.recv(65536)  # type: ignore[union-attr]
            if b"\r\n\r\n" in received[n]:
                answered[n] = (time.perf_counter() - start) * 1000
                waiting.unregister(key.fileobj)
    for client in clients:
        client.close()
    times = sorted(answered.values())
    if not times:
        raise SystemExit(f"no answer within {args.timeout:g} s")
    print(f"{len(clients)} new connections, {len(times)} answered within {args.timeout:g} s; "
          f"first answer ms: min {times[0]:.0f}, p50 {times[len(times) // 2]:.0f}, "
          f"max {times[-1]:.0f}")


if __name__ == "__main__":
    main()
