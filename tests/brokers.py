"""RabbitMQ for the tests: a virtual host of the run's own on the machine's server.

Each run (and each overlapping run on the same machine) gets a fresh vhost, so queues,
messages and the delayed-delivery exchanges of one run never reach another's workers.
Vhosts are made with ``rabbitmqctl`` (the tests run as root beside the server, as CI does).
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote, urlsplit, urlunsplit

from service.embedded import port_open


def rabbitmqctl(*args: str) -> str:
    """Run rabbitmqctl against the local node; its output."""
    exe = shutil.which("rabbitmqctl")
    if exe is None:
        raise RuntimeError("rabbitmqctl is not installed (Debian: rabbitmq-server)")
    done = subprocess.run([exe, *args], capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip()[-500:]}")
    return done.stdout


@contextmanager
def fresh_vhost(base_url: str, *, prefix: str) -> Iterator[str]:
    """A new vhost on the server ``base_url`` names (its user gets every permission); the
    broker URL of it. Deleted afterwards, with whatever is left in it."""
    parts = urlsplit(base_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 5672
    if not port_open(port, host):
        raise RuntimeError(
            f"no RabbitMQ answers on {host}:{port} (start it: rabbitmq-server -detached)"
        )
    user = parts.username or "guest"
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, user, ".*", ".*", ".*")
        yield urlunsplit(parts._replace(path="/" + quote(name, safe="")))
    finally:
        rabbitmqctl("delete_vhost", name)
