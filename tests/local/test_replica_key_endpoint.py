"""The endpoint in front of replicas' fronts (real HAProxy 2.6, the rendered haproxy.cfg): its health
check and its requests carry the replica key from its map, so a replica whose port takes only keyed
requests (service/replica_front.py) is UP and serves; a key a client sends is replaced by the map's.
Without the header in haproxy.cfg, the front answers 401 to the check and the slot never comes UP.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from live_endpoint import REPLICA_KEY, Endpoint, ask, cluster_with, replica, running_endpoint

from nemotron_deploy.service import replica_front

FRONT = "127.0.0.2"  # the replica's node address; NeMo's stand-in stays on 127.0.0.1, same port


@pytest.fixture
def fronted(tmp_path) -> Iterator[tuple[Endpoint, object, list[str | None]]]:
    key_file = tmp_path / "replica.key"
    key_file.write_text(REPLICA_KEY + "\n")
    rep = replica()
    seen: list[str | None] = []  # the replica key header of each request the front forwarded

    class Recording(replica_front.FrontHandler):
        def _forward(self):
            seen.append(self.headers.get(replica_front.KEY_HEADER))
            super()._forward()

    front = replica_front.FrontServer((FRONT, rep.port), replica_front.KeyFile(str(key_file)), rep.port, 30.0)
    front.RequestHandlerClass = Recording
    threading.Thread(target=front.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        with running_endpoint(cluster_with(tmp_path), 1, tmp_path / "ep") as ep:
            ep.sync(r1=(FRONT, rep.port))
            ep.wait_status("r1", "up")
            yield ep, rep, seen
    finally:
        front.shutdown()
        front.server_close()
        rep.handle.stop()


def test_the_endpoint_reaches_a_replica_behind_its_front(fronted):
    ep, rep, seen = fronted
    for i in range(3):
        status, text = ep.put(ask(f"Through the front {i}:"))
        assert status == 200 and '"sentences"' in text, text
    assert len(rep.requests) == 3
    assert seen and all(key == REPLICA_KEY for key in seen)


def test_a_key_sent_by_a_client_is_replaced_by_the_endpoints(fronted):
    ep, rep, seen = fronted
    status, _, _ = ep.request(
        "PUT", "/generate", ask("Mine:"), headers={replica_front.KEY_HEADER: "client-chosen-key-000000"}
    )
    assert status == 200
    assert seen[-1:] == [REPLICA_KEY]
