"""``tally bench``: one measurement against a running server, or the whole suite.

    tally bench run --preset viral --mode open --rate 2000 --duration 20 --out bench-results
    tally bench suite --out bench-results          (what ``make bench`` runs, about 15-20 minutes)
    tally bench suite --quick --out /tmp/b         (seconds: only proves the harness works)
    tally bench suite --cluster-only --out bench-results   (the cluster's CPU per role: 2 minutes)
    tally bench cluster-profile --out bench-results  (a like's cost per role, beside naive PostgreSQL)
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import orjson

from tally_dev.bench.workloads import PRESETS, Params


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("bench", help="load generator and benchmark suite", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    bsub = p.add_subparsers(dest="bench_command", required=True)
    r = bsub.add_parser("run", help="one run against a running server (--url)")
    r.add_argument("--preset", choices=sorted(PRESETS), default="uniform",
                   help="; ".join(f"{k}: {v}" for k, v in PRESETS.items()).replace("%", "%%"))
    r.add_argument("--mode", choices=["open", "closed"], default="closed")
    r.add_argument("--rate", type=float, default=0.0, help="operations/s offered (open loop)")
    r.add_argument("--items", type=int, default=Params.items, help="item space")
    r.add_argument("--bulk-size", type=int, default=Params.bulk_size,
                   help="likes per /v1/bulk request (bulk preset)")
    _common(r)
    r.set_defaults(fn=cmd_run)
    s = bsub.add_parser("suite", help="Tally and its peers side by side (starts its own servers)")
    s.add_argument("--quick", action="store_true", help="seconds-long smoke version, no peers")
    s.add_argument("--peers", default="bare,redis-always,redis-everysec,pg",
                   help="comma list of lean peers; empty for none")
    s.add_argument("--rounds", type=int, help="interleaved rounds of the side-by-side maxima")
    s.add_argument("--compare-connections", help="comma list of connection counts each "
                   "server's maxima are probed at (default 32,64,128); --connections N: N alone")
    s.add_argument("--no-wrk", action="store_true", help="no second generator (wrk)")
    s.add_argument("--no-cluster", action="store_true", help="skip Tally on its scale-out backends")
    s.add_argument("--cluster-only", action="store_true",
                   help="only the cluster, with the CPU of each role (for tally capacity --from)")
    _common(s)
    s.set_defaults(fn=cmd_suite)
    c = bsub.add_parser("cluster-profile", help="CPU, statements and messages per like in each "
                                                "cluster role, beside the naive PostgreSQL peer")
    c.add_argument("--duration", type=float, default=6.0, help="measured seconds per run")
    c.add_argument("--rounds", type=int, default=2, help="interleaved rounds (medians)")
    c.add_argument("--connections", type=int, default=32)
    c.add_argument("--baseline", type=Path, help="another checkout of Tally (e.g. a git "
                   "worktree of an earlier commit) run as a second cluster in the same rounds")
    c.add_argument("--open-share", type=float, default=0.0,
                   help="after each closed-loop run, an open-loop run at this share of its "
                        "maximum (e.g. 0.7, the targets' load): p50/p99 and CPU per like there")
    c.add_argument("--out", type=Path, default=Path("bench-results"))
    c.set_defaults(fn=cmd_cluster_profile)
    g = bsub.add_parser("grow", help="Tally (embedded, or --cluster) with N likes stored vs "
                                     "empty (loads them straight into the database)")
    g.add_argument("--sizes", default="0,1000000,10000000", help="comma list of likes stored")
    g.add_argument("--duration", type=float, default=6.0, help="measured seconds per run")
    g.add_argument("--out", type=Path, default=Path("bench-results"))
    g.add_argument("--keep", type=Path, help="keep each size's loaded database here and reuse "
                                             "it on later runs (delete it when done: ~48 B a like)")
    g.add_argument("--warm", type=float, default=None,
                   help="seconds of unmeasured likes and feeds after each size's first "
                        "measurement, then both measured again (default 30; 0: only the first; "
                        "embedded only)")
    g.add_argument("--cluster", action="store_true",
                   help="the dev cluster at its smallest (one API, relay, aggregator, PostgreSQL) "
                        "instead of Tally embedded; its likes are loaded into PostgreSQL")
    g.set_defaults(fn=cmd_grow)
    u = bsub.add_parser("cpu", help="CPU per request of Tally's server variants (uvicorn, "
                                    "2 API processes, granian) under wrk, interleaved rounds")
    u.add_argument("--variants", default="uvicorn,uvicorn-2p,granian")
    u.add_argument("--presets", default="uniform,feed", help="wrk workloads: uniform, viral, "
                                                             "feed, counts")
    u.add_argument("--rounds", type=int, default=3)
    u.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    u.add_argument("--connections", type=int, default=32)
    u.add_argument("--base", type=Path, help="also `tally serve` from this source tree (a git "
                                             "worktree of the commit before a change)")
    u.add_argument("--together", action="store_true", help="drive every variant at the same "
                                                           "time in each round (a load change "
                                                           "then falls on all of them)")
    u.add_argument("--out", type=Path, default=Path("bench-results"))
    u.set_defaults(fn=cmd_cpu)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=float, help="measured seconds per run")
    p.add_argument("--connections", type=int, help="keep-alive connections, all workers")
    p.add_argument("--workers", type=int, help="load generator processes")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("bench-results"))


def cmd_run(args: argparse.Namespace) -> int:
    from tally_dev.bench import loadgen
    from tally_dev.bench.plots import plot_all
    from tally_dev.bench.report import machine, markdown_runs, run_dict

    url = urlsplit(args.url)
    spec = loadgen.RunSpec(name=f"{args.preset}-{args.mode}", host=url.hostname or "127.0.0.1",
                           port=url.port or 80, preset=args.preset, mode=args.mode, rate=args.rate,
                           duration_s=args.duration or 10.0, connections=args.connections or 32,
                           workers=args.workers or 1, seed=args.seed,
                           params=Params(items=args.items, bulk_size=args.bulk_size),
                           run_id=int(time.time()) % 3_000_000)  # fresh users run after run
    result = run_dict(loadgen.run(spec))
    result["target"] = args.url
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"machine": machine(), "command": " ".join(sys.argv), "runs": [result]}
    (args.out / "result.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    table = markdown_runs([result])
    (args.out / "results.md").write_text(table)
    plot_all(doc, args.out)
    print(table)
    return 1 if result["errors"] else 0


def cmd_suite(args: argparse.Namespace) -> int:
    from tally_dev.bench.report import markdown_checks
    from tally_dev.bench.suite import QUICK, SuitePlan, run_suite
    from tally_dev.bench.summary import side_by_side_table

    plan = QUICK if args.quick else SuitePlan()
    peers = tuple(p for p in args.peers.split(",") if p) if not args.quick else ()
    plan = replace(plan, peers=peers, seed=args.seed, cluster=plan.cluster and not args.no_cluster,
                   cluster_only=args.cluster_only,
                   wrk=plan.wrk and not args.no_wrk,
                   **{k: v for k, v in (("duration_s", args.duration), ("rounds", args.rounds),
                                        ("connections", args.connections),
                                        ("workers", args.workers)) if v})
    if args.compare_connections or args.connections:
        levels = args.compare_connections or str(args.connections)
        plan = replace(plan, compare_connections=tuple(int(n) for n in levels.split(",")))
    result = run_suite(args.out, plan)
    print(markdown_checks(result["checks"]))
    print(side_by_side_table(result["runs"], result.get("connections")))
    print(f"results: {args.out / 'results.md'}, {args.out / 'result.json'}")
    return 0


def cmd_cluster_profile(args: argparse.Namespace) -> int:
    from tally_dev.bench.clusterprof import ProfilePlan, run

    result = run(args.out, ProfilePlan(duration_s=args.duration, rounds=args.rounds,
                                       connections=args.connections, baseline=args.baseline,
                                       open_share=args.open_share))
    print((args.out / "cluster-profile.md").read_text())
    # An open-loop run that falls behind reports its late requests as errors: a result, not a
    # failure of the profile.
    return 1 if any(r["errors"] for r in result["runs"] if not r["offered_per_s"]) else 0


def cmd_cpu(args: argparse.Namespace) -> int:
    from tally_dev.bench.cpucompare import run

    result = run(args.variants.split(","), args.presets.split(","), args.rounds, args.duration,
                 args.connections, args.out, args.base, args.together)
    print(result["table"])
    return 1 if any(r["errors"] for r in result["runs"]) else 0


def cmd_grow(args: argparse.Namespace) -> int:
    sizes = [int(x) for x in args.sizes.split(",") if x]
    if args.cluster:
        from tally_dev.bench import grow_cluster

        if args.keep or args.warm is not None:
            raise SystemExit("--keep and --warm apply to the embedded database only")
        result = grow_cluster.run(sizes, args.out, args.duration)
        print((args.out / "grow-cluster.md").read_text())
        return 0 if result["rows"] else 1
    from tally_dev.bench.grow import WARM_S, run

    result = run(sizes, args.out, args.duration, keep=args.keep,
                 warm_s=WARM_S if args.warm is None else args.warm)
    print((args.out / "grow.md").read_text())
    return 0 if result["rows"] else 1
