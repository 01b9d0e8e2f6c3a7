"""A network namespace joined to this one by a veth pair, whose link a test can cut and mend.

For chaos tests that need a real network partition between processes on one machine: start a
process inside the namespace (``prefix()`` + its argv), talk to it at ``inside``, then
``partition()`` and ``heal()``. Two namespaces can reach each other through this one
(``reach()``), and that path alone can be cut (``sever()``, ``mend()``). Needs root and
iproute2 (``available()`` says why not).

Layout: namespace ``pdtest-<pid>-<n>`` holding ``lo`` and one veth end at ``inside`` (10.231.x.2
of a private /30); the other end, ``pdt<pid>r<n>`` in this namespace, holds ``outside``
(10.231.x.1; a local address here, so a process here can bind it and be reached from inside).

A partition makes every packet between the two sides vanish, in both directions, with no RST
and no ICMP error: a connection in flight just stops, a new one times out, as when a real
network splits. Both ends carry a permanent neighbour entry for the other's address;
``partition()`` points both at a MAC address no interface has, so each frame reaches the far
veth end and is dropped there as addressed to another host; ``heal()`` points them back, and
TCP's retransmissions carry on where they stopped. (Setting a link down is no partition: the
side whose link goes down loses its route, so its own sends fail at once, and a packet sent
here would follow the default route instead.)

Invariants: names and subnets are unique among concurrent runs (the pid is in every name, the
subnet is picked under a file lock from those not in use); the namespace and the veth pair are
always deleted on exit, and namespaces left by dead runs are deleted on the next creation.
"""

from __future__ import annotations

import fcntl
import ipaddress
import itertools
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

PREFIX = "pdtest-"
SUPERNET = ipaddress.IPv4Network("10.231.0.0/16")
NOWHERE_MAC = "02:00:00:00:00:01"  # locally administered, on no interface
_LOCK = Path(tempfile.gettempdir()) / "pdserve-netns.lock"
_counter = itertools.count()  # namespaces this process made: the n in their names


def _ip(*args: str, netns: str | None = None) -> str:
    """Run ``ip ARGS`` (inside ``netns`` if given); its stdout, or RuntimeError with stderr."""
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def available() -> str | None:
    """Why network namespaces cannot be used here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "network namespaces need iproute2 (`ip`)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        _ip("netns", "add", probe)
        _ip("netns", "del", probe)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot create a network namespace: {exc}"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_dead_runs() -> None:
    """Delete namespaces (and so their veth pairs) whose creating process is gone."""
    for line in _ip("netns", "list").splitlines():
        match = re.match(rf"{PREFIX}(\d+)-\S+", line)
        if match and not _alive(int(match.group(1))):
            with_veth = f"pdt{match.group(1)}r"
            for link in re.findall(rf"\d+: ({with_veth}\d+)@", _ip("-o", "link", "show")):
                subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)
            subprocess.run(["ip", "netns", "del", match.group(0)], capture_output=True, check=False)


def _free_subnet(start: int) -> ipaddress.IPv4Network:
    """A /30 of ``SUPERNET`` that no address or route here overlaps, searching from ``start``."""
    used = [
        ipaddress.IPv4Network(net, strict=False)
        for net in re.findall(r"(10\.231\.[\d.]+(?:/\d+)?)", _ip("-4", "-o", "addr", "show"))
        + re.findall(r"^(10\.231\.[\d./]+)", _ip("-4", "route", "show"), re.MULTILINE)
    ]
    subnets = list(SUPERNET.subnets(new_prefix=30))
    for i in range(len(subnets)):
        net = subnets[(start + i) % len(subnets)]
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError(f"no free /30 left in {SUPERNET}")


class NetNamespace:
    """One namespace and its veth pair; a context manager that always deletes both."""

    def __init__(self) -> None:
        n = next(_counter)
        pid = os.getpid()
        self.name = f"{PREFIX}{pid}-{n}"
        self.veth = f"pdt{pid}r{n}"  # this side's end: IFNAMSIZ allows 15 characters
        self.inside_veth = "veth0"  # alone in its namespace: no name to collide with
        self.subnet: ipaddress.IPv4Network | None = None
        self.inside = ""
        """The address of the namespace's end (reach a process inside here)."""
        self.outside = ""
        """The address of this side's end (a process here bound to it is reachable inside)."""
        self.partitioned = False
        self._macs: tuple[str, str] = ("", "")
        self._seed = pid * 8 + n

    def __enter__(self) -> NetNamespace:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _create(self) -> None:
        with _LOCK.open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # pick a subnet and take it, one run at a time
            _sweep_dead_runs()
            net = _free_subnet(self._seed)
            outside, inside = (str(a) for a in net.hosts())
            _ip("netns", "add", self.name)
            peer = ("peer", "name", self.inside_veth, "netns", self.name)  # made inside
            _ip("link", "add", self.veth, "type", "veth", *peer)
            _ip("addr", "add", f"{outside}/30", "dev", self.veth)
            _ip("addr", "add", f"{inside}/30", "dev", self.inside_veth, netns=self.name)
        self.subnet, self.inside, self.outside = net, inside, outside
        _ip("link", "set", self.veth, "up")
        _ip("link", "set", "lo", "up", netns=self.name)
        _ip("link", "set", self.inside_veth, "up", netns=self.name)
        self._macs = (self._mac(), self._mac(self.name))
        self._point_neighbours(self._macs)

    def _mac(self, netns: str | None = None) -> str:
        dev = self.inside_veth if netns else self.veth
        match = re.search(r"link/ether ([0-9a-f:]+)", _ip("link", "show", dev, netns=netns))
        if match is None:
            raise RuntimeError(f"{dev} has no MAC address")
        return match.group(1)

    def _point_neighbours(self, macs: tuple[str, str]) -> None:
        """This side's entry for ``inside`` -> ``macs[1]``; the inside's for ``outside`` ->
        ``macs[0]``. Permanent: no ARP ever overrides or probes them."""
        outside_mac, inside_mac = macs
        common = ("nud", "permanent")
        _ip("neigh", "replace", self.inside, "lladdr", inside_mac, "dev", self.veth, *common)
        _ip(
            "neigh",
            "replace",
            self.outside,
            "lladdr",
            outside_mac,
            "dev",
            self.inside_veth,
            *common,
            netns=self.name,
        )

    def reach(self, other: NetNamespace) -> None:
        """Let processes in this namespace and ``other`` reach each other, through this side:
        forwarding on the two veth ends here only (no other interface forwards), and a route in
        each namespace to the other's /30. A partition of either cuts that path too."""
        self._forward(other, True)
        _ip("route", "add", str(other.subnet), "via", self.outside, netns=self.name)
        _ip("route", "add", str(self.subnet), "via", other.outside, netns=other.name)

    def sever(self, other: NetNamespace) -> None:
        """Cut the path :meth:`reach` made (each namespace still reaches this side): this side
        stops forwarding between them and drops what they send each other, silently."""
        self._forward(other, False)

    def mend(self, other: NetNamespace) -> None:
        """Undo :meth:`sever`."""
        self._forward(other, True)

    def _forward(self, other: NetNamespace, on: bool) -> None:
        for net in (self, other):
            Path(f"/proc/sys/net/ipv4/conf/{net.veth}/forwarding").write_text("1" if on else "0")

    def prefix(self) -> list[str]:
        """Prepend to an argv to run it inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def partition(self) -> None:
        """From now on every packet between the two sides vanishes."""
        self._point_neighbours((NOWHERE_MAC, NOWHERE_MAC))
        self.partitioned = True

    def heal(self) -> None:
        """Packets flow again; connections that were cut carry on by retransmission."""
        self._point_neighbours(self._macs)
        self.partitioned = False

    def close(self) -> None:
        """Delete the veth pair and the namespace (idempotent; a process still inside keeps
        running, cut off: stop it first)."""
        subprocess.run(["ip", "link", "del", self.veth], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)
