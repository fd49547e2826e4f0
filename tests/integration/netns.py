"""A small virtual network of Linux network namespaces for integration tests (root only).

    hub namespace:  bridge br0 <- one port per host (h-<host>)
    host namespace: lo up, eth0 = 10.231.0.X/24, the other end of the veth to the hub

Nothing is created in, or routed from, the root namespace: the hub-side veth ends are created
inside the hub namespace and the host-side ends inside their own namespaces, so the only
addresses a process in a host namespace can reach are its own and those of the other hosts on
the bridge. Namespace names carry the test process's pid (`sps<pid>-<host>`), so parallel runs
do not collide; `sweep_stale()` removes what a killed run left behind (only names with our
prefix whose pid is no longer alive).

A process started with `VirtualNet.argv(host, ...)` runs under `ip netns exec`, which execs the
command in place: the pid (and process group) the caller gets is the command's own.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time

SUBNET = "10.231.0"            # a private /24 used by nothing else on the machine
PREFIX = "sps"                 # namespace names: sps<pid>-<host>
IP_TIMEOUT_S = 30.0
_NAME = re.compile(rf"^{PREFIX}(\d+)-[a-z0-9]+$")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       stdin=subprocess.DEVNULL, timeout=IP_TIMEOUT_S)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def unavailable_reason() -> str | None:
    """Why this machine cannot build the network (None when it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        r = _ip("netns", "add", probe, check=False)
        if r.returncode != 0:
            return f"`ip netns add` failed: {r.stderr.strip()}"
        r = _ip("-n", probe, "link", "add", "name", "br0", "type", "bridge", check=False)
        if r.returncode != 0:
            return f"no Linux bridge in a namespace: {r.stderr.strip()}"
        r = _ip("-n", probe, "link", "add", "name", "v0", "type", "veth", "peer", "name", "v1", check=False)
        if r.returncode != 0:
            return f"no veth pairs in a namespace: {r.stderr.strip()}"
        r = subprocess.run(["ip", "netns", "exec", probe, "true"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=IP_TIMEOUT_S)
        if r.returncode != 0:
            return f"`ip netns exec` failed: {r.stderr.strip()}"
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`ip netns` unusable: {exc}"
    finally:
        _ip("netns", "del", probe, check=False)


def list_namespaces() -> list[str]:
    r = _ip("netns", "list", check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_pids_in(ns: str) -> list[int]:
    """SIGKILL every process inside namespace `ns` (only ever one of ours); returns the pids."""
    r = _ip("netns", "pids", ns, check=False)
    pids = [int(p) for p in r.stdout.split() if p.isdigit()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def sweep_stale() -> list[str]:
    """Delete namespaces left by earlier runs of these tests that were killed before their
    finalizer ran: names sps<pid>-* whose pid is gone. Returns what was removed."""
    removed = []
    for ns in list_namespaces():
        m = _NAME.match(ns)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            _kill_pids_in(ns)
            _ip("netns", "del", ns, check=False)
            removed.append(ns)
    return removed


class VirtualNet:
    """Namespaces `hub` (a bridge) and one per host, each host at SUBNET.<octet>/24."""

    def __init__(self, hosts: dict[str, int]):
        for host, octet in hosts.items():
            assert re.fullmatch(r"[a-z0-9]{1,12}", host) and host != "hub", host
            assert 1 <= octet <= 254, octet
        assert len(set(hosts.values())) == len(hosts), "two hosts share an address"
        self.hosts = dict(hosts)
        self.tag = f"{PREFIX}{os.getpid()}"
        self.hub = f"{self.tag}-hub"
        self.created: list[str] = []

    # -- names ---------------------------------------------------------------------------
    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def ip(self, host: str) -> str:
        return f"{SUBNET}.{self.hosts[host]}"

    def addr(self, host: str, port: int) -> str:
        return f"{self.ip(host)}:{port}"

    @staticmethod
    def port(host: str) -> str:
        """The hub-side end of `host`'s veth (a bridge port)."""
        return f"h-{host}"

    def argv(self, host: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host), *argv]

    # -- building and tearing down -------------------------------------------------------
    def create(self, ready_timeout_s: float = 30.0) -> None:
        try:
            self._add_ns(self.hub)
            _ip("-n", self.hub, "link", "set", "lo", "up")
            _ip("-n", self.hub, "link", "add", "name", "br0", "type", "bridge")
            _ip("-n", self.hub, "link", "set", "br0", "up")
            for host in self.hosts:
                ns, port = self.ns(host), self.port(host)
                self._add_ns(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
                # both ends born outside the root namespace: hub end in hub, host end in ns
                _ip("-n", self.hub, "link", "add", "name", port, "type", "veth",
                    "peer", "name", "eth0", "netns", ns)
                _ip("-n", self.hub, "link", "set", port, "master", "br0")
                _ip("-n", self.hub, "link", "set", port, "up")
                _ip("-n", ns, "addr", "add", f"{self.ip(host)}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
            self._wait_forwarding(ready_timeout_s)
        except BaseException:
            self.destroy()
            raise

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self.created.append(ns)

    def _wait_forwarding(self, timeout_s: float) -> None:
        """Every bridge port forwarding and every host's eth0 up (operstate) before use."""
        end = time.monotonic() + timeout_s
        while True:
            pending = [h for h in self.hosts
                       if self.bridge_port_state(h) != 3 or self.operstate(h) != "up"]
            if not pending:
                return
            if time.monotonic() > end:
                raise RuntimeError(f"links of {pending} not forwarding after {timeout_s}s")
            time.sleep(0.1)

    def destroy(self) -> list[str]:
        """Kill whatever still runs in our namespaces, then delete them. Idempotent; never
        raises. Returns the namespaces that could not be deleted (normally none)."""
        for ns in self.created:
            _kill_pids_in(ns)
        for ns in self.created:
            # a process killed a moment ago may still hold the namespace: wait for it to go
            end = time.monotonic() + 10
            while _kill_pids_in(ns) and time.monotonic() < end:
                time.sleep(0.05)
        failed = []
        for ns in reversed(self.created):
            r = _ip("netns", "del", ns, check=False)
            if r.returncode != 0 and ns in list_namespaces():
                failed.append(ns)
        self.created = [ns for ns in self.created if ns in failed]
        return failed

    # -- faults and readings --------------------------------------------------------------
    def cut(self, host: str) -> None:
        """Pull `host`'s cable: its bridge port goes down, so nothing reaches it or leaves it
        (its own eth0 loses carrier; its processes see only silence and timeouts)."""
        _ip("-n", self.hub, "link", "set", self.port(host), "down")

    def heal(self, host: str) -> None:
        """Plug `host`'s cable back in."""
        _ip("-n", self.hub, "link", "set", self.port(host), "up")

    def _read_sys(self, ns: str, path: str) -> str:
        r = subprocess.run(["ip", "netns", "exec", ns, "cat", path], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=IP_TIMEOUT_S)
        return r.stdout.strip() if r.returncode == 0 else ""

    def bridge_port_state(self, host: str) -> int:
        text = self._read_sys(self.hub, f"/sys/class/net/br0/brif/{self.port(host)}/state")
        return int(text) if text.isdigit() else -1

    def operstate(self, host: str) -> str:
        return self._read_sys(self.ns(host), "/sys/class/net/eth0/operstate")

    def port_bytes(self, host: str) -> tuple[int, int]:
        """(bytes the hub received from host, bytes the hub sent to host) on its bridge port."""
        rx = self._read_sys(self.hub, f"/sys/class/net/{self.port(host)}/statistics/rx_bytes")
        tx = self._read_sys(self.hub, f"/sys/class/net/{self.port(host)}/statistics/tx_bytes")
        return int(rx or 0), int(tx or 0)

    def routes(self, host: str) -> list[str]:
        r = _ip("-n", self.ns(host), "-4", "route", "show", check=False)
        return [line.strip() for line in r.stdout.splitlines() if line.strip()]
