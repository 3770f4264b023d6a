"""Several hosts on one machine: Linux network namespaces joined by a bridge.

``Network`` makes a switch namespace holding a bridge and one namespace per host, each
with a veth pair to the bridge, an address on the test's own subnet and no default route,
so nothing in them can reach anything but the other hosts. It removes them all, and every
process still inside them, when it closes. Every server runs inside a host namespace and
is started here; the machine's own services are never used.

The test process talks to the hosts from a host of its own (``client``): ``Host.call``
runs a function on a thread that joined that namespace (``setns`` changes the network
namespace of the calling thread only), so sockets it opens live there.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000


def ip(*args: str, netns: str | None = None) -> None:
    """Run ``ip`` (inside ``netns`` when given); raise with its error on failure."""
    argv = ["ip", *args] if netns is None else ["ip", "-n", netns, *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


def namespaces_available() -> str | None:
    """None when this process can create network namespaces, else why not."""
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"dgprobe{os.getpid()}"
    try:
        ip("netns", "add", probe)
    except RuntimeError as exc:
        return f"cannot create a network namespace here: {exc}"
    ip("netns", "del", probe)
    return None


def _enter(netns: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {netns} failed")
    finally:
        os.close(fd)


@dataclass
class Host:
    """One network namespace on the bridge: a name, an address, its interface."""

    name: str
    netns: str
    address: str
    link: str = "eth0"
    _pool: ThreadPoolExecutor | None = field(default=None, repr=False)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on a thread inside this host's namespace; its result."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=32,
                thread_name_prefix=self.name,
                initializer=_enter,
                initargs=(self.netns,),
            )
        return self._pool.submit(fn, *args).result()

    def argv(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def link_down(self) -> None:
        """Cut the host off the network (its processes keep running)."""
        ip("link", "set", self.link, "down", netns=self.netns)

    def link_up(self) -> None:
        ip("link", "set", self.link, "up", netns=self.netns)

    def cpu_by_pid(self) -> dict[int, float]:
        """CPU seconds used so far by each process now in this host (with its waited-for
        children); sample it often, as a process that exits takes its share with it."""
        pids = subprocess.run(
            ["ip", "netns", "pids", self.netns], capture_output=True, text=True, check=False
        ).stdout.split()
        out: dict[int, float] = {}
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            ticks = sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
            out[int(pid)] = ticks / os.sysconf("SC_CLK_TCK")
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


class Network:
    """A bridge in a namespace of its own, and hosts plugged into it."""

    def __init__(self, subnet_prefix: str = "10.88.0") -> None:
        self.tag = f"dg{os.getpid() % 100000}{uuid.uuid4().hex[:3]}"
        self.prefix = subnet_prefix
        self.switch = f"{self.tag}-sw"
        self.hosts: dict[str, Host] = {}
        ip("netns", "add", self.switch)
        ip("link", "add", "br0", "type", "bridge", netns=self.switch)
        ip("link", "set", "br0", "up", netns=self.switch)

    @property
    def cidr(self) -> str:
        return f"{self.prefix}.0/24"

    def add(self, name: str, last_octet: int) -> Host:
        """A new host namespace at ``{prefix}.{last_octet}``, plugged into the bridge."""
        netns = f"{self.tag}-{name}"
        address = f"{self.prefix}.{last_octet}"
        ip("netns", "add", netns)
        ip("link", "set", "lo", "up", netns=netns)
        # Both ends are made in the host's namespace, then one is moved to the switch.
        port = f"p{last_octet}"
        ip("link", "add", "eth0", "type", "veth", "peer", "name", port, netns=netns)
        ip("link", "set", port, "netns", self.switch, netns=netns)
        ip("link", "set", port, "master", "br0", netns=self.switch)
        ip("link", "set", port, "up", netns=self.switch)
        ip("addr", "add", f"{address}/24", "dev", "eth0", netns=netns)
        ip("link", "set", "eth0", "up", netns=netns)
        host = self.hosts[name] = Host(name, netns, address)
        return host

    def close(self) -> None:
        """Stop whatever still runs in the namespaces, then remove them."""
        for host in self.hosts.values():
            host.close()
        for netns in [h.netns for h in self.hosts.values()] + [self.switch]:
            for _ in range(20):  # bounded: a process that ignores SIGKILL is not ours
                pids = subprocess.run(
                    ["ip", "netns", "pids", netns], capture_output=True, text=True, check=False
                ).stdout.split()
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
                time.sleep(0.1)
            with contextlib.suppress(RuntimeError):
                ip("netns", "del", netns)


def port_answers(host: Host, address: str, port: int) -> bool:
    """True when ``address:port`` accepts a TCP connection as seen from ``host``."""

    def probe() -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex((address, port)) == 0

    return host.call(probe)


class Proc:
    """A process inside a host namespace, in a process group of its own."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.name, self.argv, self.log, self.env = name, argv, log, env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            self.argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        out.close()
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.running and self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole group: a host that dies, not one that shuts down."""
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> None:
        if not self.running or self.proc is None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()


def wait_until(predicate: Callable[[], Any], *, timeout: float, what: str) -> Any:
    """Poll ``predicate`` until truthy; raise TimeoutError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


class Receiver:
    """A webhook receiver on the client host: counts each webhook-id it is sent."""

    def __init__(self, host: Host, port: int) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.received: dict[str, int] = {}
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                with outer.lock:
                    wid = self.headers.get("webhook-id", "")
                    outer.received[wid] = outer.received.get(wid, 0) + 1
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        # The listening socket is made inside the host's namespace; serving it need not be.
        self.server = host.call(lambda: ThreadingHTTPServer((host.address, port), Handler))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Balancer:
    """A TCP load balancer on its own host, as in front of any set of gateways: each
    connection goes to the next backend that accepts one, so a dead gateway is skipped
    (what a health-checked L4 balancer does). Wiro's callbacks come through it."""

    def __init__(self, host: Host, port: int, backends: list[tuple[str, int]]) -> None:
        self.host, self.port, self.backends = host, port, backends
        self.next = 0
        self.lock = threading.Lock()
        self.listener = host.call(self._listen)
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _listen(self) -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host.address, self.port))
        s.listen(128)
        return s

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _backend(self) -> socket.socket | None:
        with self.lock:
            start = self.next
            self.next = (self.next + 1) % len(self.backends)
        for i in range(len(self.backends)):  # bounded: each backend once
            address = self.backends[(start + i) % len(self.backends)]
            try:
                return socket.create_connection(address, timeout=1)
            except OSError:
                continue
        return None

    def _serve(self, conn: socket.socket) -> None:
        _enter(self.host.netns)  # connections to the backends leave from the balancer's host
        upstream = self._backend()
        if upstream is None:
            conn.close()
            return
        upstream.settimeout(None)

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)

        back = threading.Thread(target=pump, args=(upstream, conn), daemon=True)
        back.start()
        pump(conn, upstream)
        back.join(60)
        conn.close()
        upstream.close()

    def close(self) -> None:
        self.listener.close()
