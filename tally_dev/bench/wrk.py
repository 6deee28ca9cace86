"""The second load generator: Debian's ``wrk`` with the Lua scripts of ``scripts/wrk/``.

Each closed-loop maximum of the suite is measured again by wrk right after the suite's own
generator, against the same server, so no figure rests on one tool. wrk's scripts send the same
workloads (uniform and viral likes, a Zipf feed with or without the viewer's has-liked); its
random users and items differ from the seeded ones of ``workloads``. A run is a dict shaped like
``report.run_dict``'s, with ``"tool": "wrk"``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import orjson

from tally_dev.bench.workloads import Params

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts" / "wrk"

# preset -> (script, extra environment)
WORKLOADS: dict[str, tuple[str, dict[str, str]]] = {
    "uniform": ("like.lua", {}),
    "viral": ("like.lua", {"VIRAL": "0.4"}),
    "feed": ("feed.lua", {}),
    "counts": ("feed.lua", {"COUNTS_ONLY": "1"}),
}


def available() -> bool:
    return shutil.which("wrk") is not None and SCRIPTS.is_dir()


def run(name: str, url: str, preset: str, duration_s: float, connections: int,
        params: Params = Params(), threads: int = 1) -> dict[str, Any]:
    """One closed-loop run of wrk; raises if wrk fails or prints no summary."""
    script, extra = WORKLOADS[preset]
    env = {**os.environ, "ITEMS": str(params.items), "USERS": str(params.users), **extra}
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(duration_s, 1):.0f}s",
            "--timeout", "10s", "-s", str(SCRIPTS / script), url]
    done = subprocess.run(argv, env=env, capture_output=True, text=True,
                          timeout=duration_s + 60, check=False)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr[-500:] or done.stdout[-500:]}")
    w = orjson.loads(line.removeprefix("WRK_JSON "))
    seconds = w["duration_us"] / 1e6
    errors = w["non_2xx"] + w["connect"] + w["read"] + w["write"] + w["timeout"]
    return {"name": name, "tool": "wrk", "preset": preset, "mode": "closed", "offered_per_s": None,
            "throughput_per_s": (w["requests"] - w["non_2xx"]) / seconds, "ok": w["requests"] - w["non_2xx"],
            "errors": errors, "error_reasons": {k: w[k] for k in ("non_2xx", "connect", "read",
                                                                   "write", "timeout") if w[k]},
            "latency": {"p50_ms": w["p50_us"] / 1e3, "p90_ms": w["p90_us"] / 1e3,
                        "p99_ms": w["p99_us"] / 1e3, "p99.9_ms": w["p999_us"] / 1e3,
                        "max_ms": w["max_us"] / 1e3},
            "series": [], "generator_cpu_cores": None,
            "spec": {"duration_s": seconds, "connections": connections, "threads": threads,
                     "script": script, "env": extra}}
