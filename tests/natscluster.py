"""A real 3-node NATS cluster on free loopback ports (JetStream on, as deploy/k8s runs it), each
node with its monitoring port so a test can see which node a named client is connected to."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cascade.cli.embedded_nats import EmbeddedNats, free_port


class Node(EmbeddedNats):
    def __init__(self, name: str, monitor_port: int, config_file: Path, log_file: Path) -> None:
        super().__init__(config_file=config_file, log_file=log_file)
        self.name = name
        self.monitor_port = monitor_port

    def client_names(self) -> set[str]:
        """The names of the clients connected to this node now (its /connz)."""
        url = f"http://127.0.0.1:{self.monitor_port}/connz?limit=1024"
        with urllib.request.urlopen(url, timeout=5) as r:
            conns = json.loads(r.read())["connections"] or []
        return {str(c.get("name", "")) for c in conns}


@contextmanager
def nats_cluster(tmp_path: Path, size: int = 3) -> Iterator[list[Node]]:
    """The cluster's nodes, started (routes to each other; stopped after, also on failure)."""
    ports = [free_port() for _ in range(size)]
    routes = ", ".join(f"nats://127.0.0.1:{p}" for p in ports)
    nodes = []
    for i in range(size):
        conf = tmp_path / f"n{i}.conf"
        monitor = free_port()
        conf.write_text(
            f"server_name: n{i}\n"
            f"http: 127.0.0.1:{monitor}\n"
            f'jetstream {{ store_dir: "{tmp_path / f"js{i}"}" }}\n'
            f"cluster {{ name: cascade, listen: 127.0.0.1:{ports[i]}, routes: [{routes}] }}\n"
        )
        nodes.append(Node(f"n{i}", monitor, config_file=conf, log_file=tmp_path / f"n{i}.log"))
    try:
        for n in nodes:
            n.start()
        yield nodes
    finally:
        for n in nodes:
            n.stop()
