"""A free TCP port for a one-process rendezvous (`MASTER_PORT`) that torchrun did not set.

Why: several jobs on one machine (tests, benches, a converter's `--verify` next to a training run) must not
meet on the default 29500. The port is free when returned; the caller binds it soon after (a race with
another process picking the same port is possible but short).
"""
from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
