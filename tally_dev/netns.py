"""Network namespaces for regions: each region's processes in a namespace of their own, joined by
veth links on one bridge, so a partition between regions is cut in the kernel.

Layout of net ``n`` (a number, so tests and a dev cluster can run side by side): bridge
``tly<n>br`` in the root namespace at 10.250.<n>.1/24; region number i gets namespace
``tly<n>-<region>``, its end of a veth pair at 10.250.<n>.<10+i>. The root namespace (the tools,
the tests' clients) reaches every region. ``partition(a, b)`` adds a blackhole route for each
other's address inside both namespaces: their packets to each other are dropped by the kernel,
as on a cut link, while each keeps talking to its own processes and to the root namespace.
``heal`` deletes the routes. Needs root (CAP_NET_ADMIN) and ``ip`` from iproute2.

These addresses exist only inside namespaces this module creates on this machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass


class NetnsError(RuntimeError):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if check and out.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out


def available() -> str | None:
    """Why namespaces cannot be used here, or None when they can."""
    if shutil.which("ip") is None:
        return "needs ip (apt-get install iproute2)"
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    return None


@dataclass(frozen=True)
class RegionNet:
    """The namespaces and addresses of one set of regions."""

    n: int
    regions: tuple[str, ...]

    @property
    def bridge(self) -> str:
        return f"tly{self.n}br"

    def namespace(self, region: str) -> str:
        return f"tly{self.n}-{region}"

    def address(self, region: str) -> str:
        return f"10.250.{self.n}.{10 + self.regions.index(region)}"

    def exec_prefix(self, region: str) -> list[str]:
        """Prefix a command with this to run it inside the region's namespace."""
        return ["ip", "netns", "exec", self.namespace(region)]

    def _veth(self, region: str) -> tuple[str, str]:
        i = self.regions.index(region)
        return f"tly{self.n}r{i}h", f"tly{self.n}r{i}n"

    def exists(self) -> bool:
        return self.namespace(self.regions[0]) in _ip("netns", "list").stdout

    def create(self) -> None:
        """Bridge, namespaces and links (idempotent: an existing set is kept)."""
        if self.exists():
            return
        if _ip("link", "show", self.bridge, check=False).returncode != 0:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"10.250.{self.n}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for region in self.regions:
            ns, (host, inner) = self.namespace(region), self._veth(region)
            _ip("netns", "add", ns)
            _ip("link", "add", host, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", host, "master", self.bridge, "up")
            _ip("-n", ns, "addr", "add", f"{self.address(region)}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def destroy(self) -> None:
        for region in self.regions:
            _ip("netns", "del", self.namespace(region), check=False)  # takes its veth end along
            _ip("link", "del", self._veth(region)[0], check=False)
        _ip("link", "del", self.bridge, check=False)

    def link(self, region: str, up: bool) -> None:
        """Take the region off the network (its link down) or put it back. A region lost with its
        machines takes its kernel too: data a killed process left in its sockets' buffers must
        not reach the others later, as it would while the namespace still had a link."""
        _ip("link", "set", self._veth(region)[0], "up" if up else "down")

    def partition(self, a: str, b: str) -> None:
        """Drop every packet between regions a and b (both directions)."""
        for src, dst in ((a, b), (b, a)):
            _ip("-n", self.namespace(src), "route", "replace", "blackhole",
                f"{self.address(dst)}/32")

    def heal(self, pairs: Sequence[tuple[str, str]] | None = None) -> None:
        """Restore the given pairs (default: every pair)."""
        pairs = pairs or [(a, b) for a in self.regions for b in self.regions if a < b]
        for a, b in pairs:
            for src, dst in ((a, b), (b, a)):
                _ip("-n", self.namespace(src), "route", "del", "blackhole",
                    f"{self.address(dst)}/32", check=False)

    def cut(self) -> list[tuple[str, str]]:
        """The pairs of regions cut now, read from the namespaces' routes."""
        out = []
        for a in self.regions:
            routes = _ip("-n", self.namespace(a), "route", "show", "type", "blackhole").stdout
            out += [(a, b) for b in self.regions if a < b and self.address(b) in routes]
        return out
