"""Network namespaces joined to the root namespace by veth pairs, one per simulated region (root only).

    with Regions(["near", "mid", "far"]) as regs:
        regs["near"].addr     # 10.251.<i>.2, reachable from the root namespace
        regs["near"].exec     # ["ip", "netns", "exec", "strata-rt-<pid>-0"]: prefix for commands inside
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def netns_available() -> str | None:
    """None when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("ip") is None:
        return "no `ip` command"
    name = f"strata-probe-{os.getpid()}"
    try:
        _ip("netns", "add", name)
    except subprocess.CalledProcessError as e:
        return f"ip netns add failed: {e.stderr.strip()}"
    finally:
        _ip("netns", "del", name, check=False)
    return None


@dataclass
class Region:
    name: str
    ns: str
    addr: str
    host_addr: str
    veth: str

    @property
    def exec(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]


class Regions:
    def __init__(self, names: list[str], subnet_base: int = 251):
        self.names = names
        self.base = subnet_base
        self.regions: dict[str, Region] = {}

    def __getitem__(self, k: str) -> Region:
        return self.regions[k]

    def __enter__(self) -> "Regions":
        tag = os.getpid() % 10000
        try:
            for i, name in enumerate(self.names):
                ns = f"strata-rt-{tag}-{i}"
                a, b = f"srt{tag}v{i}a", f"srt{tag}v{i}b"
                _ip("netns", "add", ns)
                reg = Region(name, ns, f"10.{self.base}.{i}.2", f"10.{self.base}.{i}.1", a)
                self.regions[name] = reg
                _ip("link", "add", a, "type", "veth", "peer", "name", b)
                _ip("link", "set", b, "netns", ns)
                _ip("addr", "add", f"{reg.host_addr}/24", "dev", a)
                _ip("link", "set", a, "up")
                _ip("netns", "exec", ns, "ip", "addr", "add", f"{reg.addr}/24", "dev", b)
                _ip("netns", "exec", ns, "ip", "link", "set", b, "up")
                _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for reg in self.regions.values():
            _ip("link", "del", reg.veth, check=False)
            _ip("netns", "del", reg.ns, check=False)
        self.regions.clear()
