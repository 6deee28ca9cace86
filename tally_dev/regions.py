"""``tally cluster up --regions N``: one small Tally deployment per region, each in a network
namespace of its own (``tally_dev.netns``), replicating through JetStream leaf nodes.

Per region: PostgreSQL (one database), NATS with JetStream in the region's domain, Redis, and one
``tally serve --role all`` (API, relay and aggregators). The first region's NATS listens for
leaf nodes and the others connect to it; with ``hub=WITNESS`` a NATS server without JetStream in
the witness place is the hub instead, and every region's NATS connects to it (losing a region
then cuts no other pair's replication). Every process is named ``<kind>-<region>`` in the state
file, with its pid, so ``fail`` can SIGKILL a whole region (engines included) from any shell and
``recover`` restart it on the same ports and data. ``partition``/``heal`` cut and restore the
kernel's routes between two namespaces.

With ``witness=True`` every region also runs an etcd member and, when the regions are even in
number, a witness member runs in a namespace of its own (``witness``, a place that is no
region): the quorum of ``tally.workers.failover``'s automatic failover. The witness takes
``fail``, ``recover`` and ``partition`` like a region. ``failover`` and the rejoin in ``recover`` are the
product's own operations (``tally.regions_admin``), run with each region's config.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tally import regions_admin
from tally.settings import load
from tally_dev.cluster import _stop_group, _toml_value
from tally_dev.engines import Engine, EngineError, free_port, missing_binaries
from tally_dev.netns import RegionNet, available
from tally_dev.ops import alive, read_state
from tally_dev.region_engines import NetEtcd, NetNats, NetNatsHub, NetPostgres, NetRedis, NetTally

DEFAULT_ROOT = Path("/tmp/tally-regions")
NAMES = ("us", "eu", "ap")
WITNESS = "witness"  # the namespace of the quorum's member that is no region
KINDS = ("etcd", "postgres", "nats", "redis", "tally")


def _distinct_port(taken: set[int]) -> int:
    """A free port none of the layout's others has: two calls of ``free_port`` may return the
    same number (nothing holds it in between), and a region's servers then collide (seen: NATS's
    leaf port taken by the region's etcd member)."""
    for _ in range(100):
        port = free_port()
        if port not in taken:
            taken.add(port)
            return port
    raise EngineError("no distinct free port found")


@dataclass
class RegionCluster:
    root: Path = DEFAULT_ROOT
    partitions: int = 8
    die_with_parent: bool = False  # tests: engines die with the test process
    sync_counters: tuple[str, ...] = ()  # counters with replication = "sync" in every region

    def __post_init__(self) -> None:
        self.root = self.root.resolve()
        self.layout_file = self.root / "regions.json"
        self.state_file = self.root / "state.json"
        self.started: dict[str, Engine] = {}

    # -- layout: fixed at ``up``, read by every later command ---------------------------------

    def layout(self) -> dict[str, Any]:
        try:
            layout: dict[str, Any] = json.loads(self.layout_file.read_text())
            return layout
        except FileNotFoundError as exc:
            raise EngineError(f"no regions laid out in {self.root}; `tally cluster up "
                              "--regions 2` first") from exc

    @property
    def regions(self) -> list[str]:
        return list(self.layout()["regions"])

    @property
    def hub(self) -> str:
        """Where the leaf-node hub runs: the first region, or the witness place."""
        return str(self.layout().get("hub") or self.regions[0])

    @property
    def net(self) -> RegionNet:
        lay = self.layout()
        outside = WITNESS in lay.get("quorum", {}) or lay.get("hub") == WITNESS
        return RegionNet(lay["net"], tuple(lay["regions"]) + ((WITNESS,) if outside else ()))

    def hub_nats(self) -> NetNatsHub:
        """The hub's NATS server, when it runs in the witness place."""
        ports = self.layout()["ports"][WITNESS]
        engine = NetNatsHub(self.root / WITNESS / "nats", ports["nats"], ports["monitor"],
                            ports["leaf"], self.net, WITNESS)
        engine.die_with_parent = self.die_with_parent
        return engine

    @property
    def quorum(self) -> dict[str, tuple[str, int, int]]:
        """The witness quorum's members: name -> (address, client port, peer port)."""
        net = self.net
        return {m: (net.address(m), p["client"], p["peer"])
                for m, p in self.layout().get("quorum", {}).items()}

    def etcd(self, member: str) -> NetEtcd:
        engine = NetEtcd(self.root / member / "etcd", member, self.quorum, self.net)
        engine.die_with_parent = self.die_with_parent
        return engine

    def config(self, region: str) -> Path:
        return self.root / region / "tally.toml"

    def api(self, region: str) -> str:
        return f"http://{self.net.address(region)}:{self.layout()['ports'][region]['api']}"

    def engines(self, region: str) -> dict[str, Engine]:
        ports, net, hub = self.layout()["ports"][region], self.net, self.hub
        home = self.root / region
        engines: dict[str, Engine] = {
            "postgres": NetPostgres(home / "pg", ports["pg"], net, region),
            "nats": NetNats(home / "nats", ports["nats"], ports["monitor"],
                            self.layout()["ports"][hub]["leaf"], net, region, hub),
            "redis": NetRedis(home / "redis", ports["redis"], net, region),
            "tally": NetTally(home / "procs", ports["api"], net, region, self.config(region))}
        if region in self.quorum:
            engines["etcd"] = self.etcd(region)
        for e in engines.values():
            e.die_with_parent = self.die_with_parent
        return engines

    # -- up, down -----------------------------------------------------------------------------

    def up(self, count: int = 2, net: int = 7, witness: bool = False,
           witness_ttl_s: float = 10.0, hub: str = "region") -> None:
        """``witness``: automatic failover through an etcd quorum (a member per region, plus one
        in the witness namespace when the regions are even in number). ``hub``: where the
        regions' NATS leaf nodes meet: ``"region"`` (the first region listens) or ``WITNESS``
        (a NATS server in the witness place, no region)."""
        if hub not in ("region", WITNESS):
            raise EngineError(f"hub must be 'region' or {WITNESS!r}, not {hub!r}")
        if (why := available()) is not None or (why := "; ".join(str(m) for m in missing_binaries())):
            raise EngineError(why)
        if any(alive(e["pid"]) for e in self._state().values()):
            raise EngineError(f"regions already run from {self.root}; `tally cluster down` first")
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o711)  # PostgreSQL runs as an unprivileged user that must enter it
        if not self.layout_file.exists():
            regions = list(NAMES[:count])
            taken: set[int] = set()
            ports = {r: {k: _distinct_port(taken)
                         for k in ("pg", "nats", "monitor", "leaf", "redis", "api")}
                     for r in regions}
            members = ([*regions, WITNESS] if count % 2 == 0 else regions) if witness else []
            quorum = {m: {"client": _distinct_port(taken), "peer": _distinct_port(taken)}
                      for m in members}
            if hub == WITNESS:
                ports[WITNESS] = {k: _distinct_port(taken) for k in ("nats", "monitor", "leaf")}
            self.layout_file.write_text(json.dumps({"net": net, "regions": regions,
                                                    "ports": ports, "quorum": quorum,
                                                    "hub": regions[0] if hub == "region" else hub,
                                                    "witness_ttl_s": witness_ttl_s,
                                                    "partitions": self.partitions}))
        self.net.create()
        try:
            self._start_witness()
            engines = {r: self.engines(r) for r in self.regions}
            self._start_all([(r, k, e) for r in self.regions for k, e in engines[r].items()
                             if k != "tally"])
            for region in self.regions:
                self._configure(region, engines[region])
            self._start_all([(r, "tally", engines[r]["tally"]) for r in self.regions])
        except BaseException:
            self.down()
            raise

    def _start_witness(self) -> None:
        """What runs in the witness place: its quorum member, the leaf-node hub."""
        if WITNESS in self.quorum:
            self._start(WITNESS, "etcd", self.etcd(WITNESS))
        if self.hub == WITNESS:
            self._start(WITNESS, "nats", self.hub_nats())

    def _resume_replication(self, timeout_s: float = 30.0) -> None:
        """After the hub's restart: once every running region's NATS is its leaf again, restart
        their sources (JetStream retries a failing source with a backoff of tens of seconds)."""
        state = self._state()
        running = [r for r in self.regions
                   if alive(state.get(f"nats-{r}", {}).get("pid"))]
        hub = self.hub_nats()
        deadline = time.monotonic() + timeout_s
        while hub.leaves() < len(running):
            if time.monotonic() > deadline:
                raise EngineError(f"the hub has {hub.leaves()} of {len(running)} leaf nodes "
                                  f"after {timeout_s:.0f} s")
            time.sleep(0.2)
        for r in running:
            asyncio.run(regions_admin.resume_sources(load(self.config(r))))

    def _start_engines(self, region: str) -> None:
        engines = self.engines(region)
        self._start_all([(region, k, e) for k, e in engines.items() if k != "tally"])
        self._configure(region, engines)

    def _configure(self, region: str, engines: dict[str, Engine]) -> None:
        """Once its engines run: the region's cache emptied, its database, its config."""
        # A cache that was SIGKILLed may have lost (everysec) the newest values an aggregator set,
        # and keep older ones nothing would replace: it is rebuilt from PostgreSQL instead.
        redis = engines["redis"]
        assert isinstance(redis, NetRedis)
        redis.flushall()
        pg = engines["postgres"]
        assert isinstance(pg, NetPostgres)
        if pg.psql("SELECT 1 FROM pg_database WHERE datname = 'tally'").strip() != "1":
            pg.create_database("tally")
        self._write_config(region, pg.dsn("tally"), engines)

    # -- credentials: clients reach the APIs over the bridge, not loopback ----------------------

    def key(self) -> str:
        """The API key the tools, the tests' clients and the regions' forwarding present."""
        return self._secret("region-key")

    def admin_token(self) -> str:
        return self._secret("admin-token")

    def _secret(self, name: str) -> str:
        path = self.root / name
        if not path.exists():
            path.write_text(secrets.token_hex(24) + "\n")
            path.chmod(0o600)
        return path.read_text().strip()

    def headers(self, admin: bool = False) -> dict[str, str]:
        return {"authorization": f"Bearer {self.admin_token() if admin else self.key()}"}

    def _write_config(self, region: str, dsn: str, engines: dict[str, Engine]) -> None:
        peers = [f"{r}={self.api(r)}" for r in self.regions if r != region]
        self.admin_token()
        keys = self.root / "api-keys.toml"
        keys.write_text(f'[[key]]\nname = "regions"\nkey = "{self.key()}"\n')
        values = {"backend": "cluster", "postgres_dsns": [dsn], "region_name": region,
                  "region_peers": peers, "region": region, "nats_url": engines["nats"].url,
                  "redis_url": engines["redis"].url, "log_partitions": self.layout()["partitions"],
                  "data_dir": str(self.root / region / "data"), "outbox_slots": 2,
                  "api_keys_file": str(keys), "region_key_file": str(self.root / "region-key"),
                  "admin_token_file": str(self.root / "admin-token"),
                  # The ledger and the probes send many requests for few users.
                  "rate_per_user": 0.0, "sync_counters": list(self.sync_counters)}
        quorum = self.quorum
        if quorum:  # this region's member first
            values["region_witness_urls"] = [f"http://{h}:{c}" for m, (h, c, _p) in
                                             sorted(quorum.items(), key=lambda m: m[0] != region)]
            values["region_witness_ttl_s"] = self.layout()["witness_ttl_s"]
        lines = ["# written by `tally cluster up --regions`", "[tally]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        self.config(region).write_text("\n".join(lines) + "\n")

    def _start(self, region: str, kind: str, engine: Engine | None = None) -> None:
        self._start_all([(region, kind, engine or self.engines(region)[kind])])

    def _start_all(self, what: list[tuple[str, str, Engine]]) -> None:
        """Launch every engine from this thread, then wait for them all at once (mostly servers
        coming up: one after the other, a two-region setup took 11-17 s here). Launched here,
        not in the waiting threads: an engine that dies with its parent (PR_SET_PDEATHSIG) dies
        with the thread that forked it."""
        for region, kind, engine in what:
            engine.launch()
            self._record(region, kind, engine)  # recorded at once: ``down`` stops it on failure
        if len(what) == 1:
            what[0][2].wait_ready(90)
            return
        with ThreadPoolExecutor(len(what)) as pool:
            list(pool.map(Engine.wait_ready, [e for _r, _k, e in what], [90.0] * len(what)))

    def _record(self, region: str, kind: str, engine: Engine) -> None:
        self.started[f"{kind}-{region}"] = engine
        state = self._state()
        assert engine.proc is not None
        state[f"{kind}-{region}"] = {"pid": engine.proc.pid, "region": region, "kind": kind,
                                     "url": engine.url, "signal": int(engine.stop_signal)}
        self.state_file.write_text(json.dumps(state, indent=2))

    def _state(self) -> dict[str, dict[str, Any]]:
        return read_state(self.state_file)

    def down(self) -> list[str]:
        """Stop every process: kind by kind (Tally before the engines it uses), the regions'
        processes of one kind at once (one after the other, a test's teardown took 8-9 s)."""
        stopped = []
        state = self._state()
        for kind in reversed(KINDS):
            names = sorted(n for n in state if n.split("-")[0] == kind)
            if not names:
                continue
            # An etcd leader hands its leadership over before it exits, which waits for a dead
            # member in vain: its data is fsynced, a kill after 3 s loses nothing.
            timeout_s = 3.0 if kind == "etcd" else 20.0
            with ThreadPoolExecutor(len(names)) as pool:
                done = list(pool.map(self._stop, names, [state[n]["signal"] for n in names],
                                     [timeout_s] * len(names)))
            stopped += [n for n, was in zip(names, done, strict=True) if was]
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()
        with contextlib.suppress(EngineError):
            self.net.destroy()
        return stopped

    def _stop(self, name: str, sig: int, timeout_s: float) -> bool:
        engine = self.started.pop(name, None)
        if engine is not None:  # a child of this process: reap it too
            alive = engine.running()
            engine.kill() if sig == signal.SIGKILL else engine.stop(timeout_s)
            return alive
        entry = self._state().get(name)
        return entry is not None and _stop_group(entry["pid"], sig, timeout_s)

    # -- failures -----------------------------------------------------------------------------

    def fail(self, region: str) -> list[str]:
        """SIGKILL every process of the region, engines included, its link down: the region is
        lost."""
        self.net.link(region, up=False)
        state = self._state()
        names = [n for n, e in state.items() if e["region"] == region]
        return [n for n in names if self._stop(n, signal.SIGKILL, 10.0)]

    def wipe(self, region: str) -> list[str]:
        """Delete a failed region's data (PostgreSQL, JetStream, Redis, Tally's own): its disks
        are lost with it. Refused while any of its processes runs."""
        state = self._state()
        if any(alive(e["pid"]) for e in state.values() if e["region"] == region):
            raise EngineError(f"{region} still runs: `tally cluster fail {region}` first")
        home = self.root / region
        gone = [d for d in ("pg", "nats", "redis", "data") if (home / d).exists()]
        for d in gone:
            shutil.rmtree(home / d)
        return gone

    def partition(self, a: str, b: str) -> None:
        self.net.partition(a, b)

    def heal(self) -> None:
        self.net.heal()

    def failover(self, failed: str, to: str) -> int:
        """The product's failover, run for every region but the failed one; the new epoch."""
        epoch = 0
        for region in self.regions:
            if region != failed:
                placed = asyncio.run(regions_admin.failover(load(self.config(region)), failed,
                                                            to))
                epoch = placed.epoch
        return epoch

    def restore(self, region: str, timeout_s: float = 30.0) -> int:
        """Give a failed-over (and rejoined) region its users back: a new epoch, stored first in
        the region that took them, and only once that region's API decides by it, in the
        others (so no two regions decide for them at once). Returns the epoch."""
        other = next(r for r in self.regions if r != region)
        placed = asyncio.run(regions_admin.placement_of(load(self.config(other))))
        if region not in placed.moved:
            raise EngineError(f"{region} was not failed over: nothing to restore")
        taker = placed.moved[region]
        nxt = placed.restore(region, time.time())
        asyncio.run(regions_admin.adopt_placement(load(self.config(taker)), nxt))
        deadline = time.monotonic() + timeout_s
        while (self.readiness(taker).get("placement_epoch") or 0) < nxt.epoch:
            if time.monotonic() > deadline:
                raise EngineError(f"{taker} did not take epoch {nxt.epoch} in {timeout_s:.0f} s")
            time.sleep(0.1)
        for r in self.regions:
            if r != taker:
                asyncio.run(regions_admin.adopt_placement(load(self.config(r)), nxt))
        return nxt.epoch

    def recover(self, region: str, survivor: str | None = None) -> regions_admin.RejoinReport:
        """Restart the region with its data; if it was failed over, rejoin it to ``survivor``
        (default: the region its users moved to) and repair counts by a recount."""
        self.net.link(region, up=True)
        if region == WITNESS:
            self._start_witness()
            if self.hub == WITNESS:
                self._resume_replication()
            return regions_admin.RejoinReport()
        self._start_engines(region)
        other = load(self.config(next(r for r in self.regions if r != region)))
        placed = asyncio.run(regions_admin.placement_of(other))
        if region not in placed.moved:
            self._start(region, "tally")
            return regions_admin.RejoinReport()
        asyncio.run(regions_admin.adopt_placement(load(self.config(region)), placed))
        self._start(region, "tally")  # its relay drains the outbox into its own stream
        return self.rejoin(region, survivor)

    def rejoin(self, region: str, survivor: str | None = None) -> regions_admin.RejoinReport:
        """The rejoin of a failed-over region whose processes run (``recover`` started them, or
        it was only cut off and fenced itself): its outbox drained, its late changes decided at
        the survivor (default: the region its users moved to), every region converged and
        recounted."""
        other = load(self.config(next(r for r in self.regions if r != region)))
        placed = asyncio.run(regions_admin.placement_of(other))
        if region not in placed.moved:
            raise EngineError(f"{region} was not failed over: nothing to rejoin")
        survivor = survivor or placed.moved[region]
        self.wait_drained(region)
        report = asyncio.run(regions_admin.rejoin(load(self.config(survivor)),
                                                  load(self.config(region))))
        for third in self.regions:
            if third not in (region, survivor):
                asyncio.run(regions_admin.source_again(load(self.config(third)), region))
        self.wait_converged()
        return report

    def wait_drained(self, region: str, timeout_s: float = 60.0) -> None:
        """Until the region's outbox is all in its log and its aggregators applied the log."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):  # an engine still starting: look again
                if asyncio.run(regions_admin.progress(load(self.config(region))))[1] == 0:
                    return
            time.sleep(0.2)
        raise EngineError(f"{region}: outbox and log not drained in {timeout_s:.0f} s")

    def lag(self) -> dict[str, dict[str, int]]:
        """Per region, per origin: messages the origin's log holds that this region's does not
        yet (-1: a region that does not answer)."""
        held: dict[str, dict[str, int]] = {
            r: self.readiness(r).get("region_held") or {} for r in self.regions}
        return {r: {o: held[o].get(o, 0) - held[r].get(o, 0) if held[r] and held[o] else -1
                    for o in self.regions if o != r} for r in self.regions}

    def progress(self) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
        """From the engines: per region, messages held per origin and messages unapplied."""
        held, behind = {}, {}
        for r in self.regions:
            held[r], behind[r] = asyncio.run(regions_admin.progress(load(self.config(r))))
        return held, behind

    def wait_converged(self, timeout_s: float = 90.0, repair: bool = True) -> float:
        """Until every region holds every origin's messages and has applied them all (read from
        the engines); then counts repaired against a recount. Returns the seconds waited."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            with contextlib.suppress(Exception):  # an engine still starting: look again
                held, behind = self.progress()
                if not any(behind.values()) and all(
                        held[r].get(o, 0) == held[o].get(o, 0)
                        for r in self.regions for o in self.regions):
                    break
            time.sleep(0.25)
        else:
            raise EngineError(f"regions did not converge in {timeout_s:.0f} s: {self.lag()}")
        waited = time.monotonic() - t0
        if repair:
            for region in self.regions:
                self.reconcile(region)
        return waited

    def reconcile(self, region: str) -> int:
        """Repair drifted toggle counts against a recount of the region's records."""
        resp = httpx.post(f"{self.api(region)}/v1/admin/reconcile", json={"repair": True},
                          headers=self.headers(admin=True), timeout=120)
        resp.raise_for_status()
        return sum(len(json.loads(line)["drifts"]) for line in resp.text.splitlines() if line)

    # -- status -------------------------------------------------------------------------------

    def readiness(self, region: str) -> dict[str, Any]:
        try:
            resp = httpx.get(f"{self.api(region)}/readyz", timeout=2.0)
            detail: dict[str, Any] = resp.json()
            detail["ready"] = resp.status_code == 200
            return detail
        except (httpx.HTTPError, ValueError) as exc:
            return {"ready": False, "error": repr(exc)}

    def status(self) -> dict[str, Any]:
        state = self._state()
        out: dict[str, Any] = {"cut": [list(p) for p in self.net.cut()], "regions": {}}
        for region in self.regions:
            procs = [{"name": n, "kind": e["kind"], "pid": e["pid"], "running": alive(e["pid"]),
                      "url": e["url"].split("@")[-1]}
                     for n, e in state.items() if e["region"] == region]
            detail = self.readiness(region)
            out["regions"][region] = {
                "api": self.api(region), "ready": detail.get("ready", False),
                "placement_epoch": detail.get("placement_epoch"),
                "sources": detail.get("region_sources", {}),
                "log_pending_messages": detail.get("log_pending_messages"),
                "outbox_backlog": detail.get("outbox_backlog"), "processes": procs}
        out["leaf_hub"] = self.hub
        out["witness"] = [{"name": n, "kind": e["kind"], "pid": e["pid"],
                           "running": alive(e["pid"]), "url": e["url"]}
                          for n, e in state.items() if e["region"] == WITNESS]
        return out
