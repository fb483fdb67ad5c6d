"""A real S3 server for tests: moto's ThreadedMotoServer on 127.0.0.1 at a free port, spoken to over HTTP by s3fs."""
from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass

import pytest

# Dummy credentials for the local server only; they open nothing anywhere else.
FAKE_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str
    env: dict[str, str]  # what a subprocess needs to reach the server

    def new_bucket(self) -> str:
        """A fresh empty bucket, created through s3fs; returns its name."""
        from manifests import storage
        name = f"repa-{uuid.uuid4().hex[:12]}"
        storage.filesystem("s3").mkdir(name)
        return name


def start_server():
    """Start moto's S3 server; returns (server, S3Server). Used by the fixture and by the demo."""
    import logging

    from moto.server import ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log per request
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    return server, S3Server(endpoint=endpoint, env={**FAKE_ENV, "AWS_ENDPOINT_URL": endpoint})


@pytest.fixture(scope="session")
def s3_server():
    """One moto S3 server per test session; its endpoint and credentials are put in os.environ, so this process
    and every subprocess a test starts use it through the standard AWS variables."""
    pytest.importorskip("s3fs", reason="pip install '.[s3]' for the object-store tests")
    pytest.importorskip("moto.server", reason="pip install '.[s3]' for the object-store tests")
    server, info = start_server()
    saved = {k: os.environ.get(k) for k in info.env}
    os.environ.update(info.env)
    try:
        yield info
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """`s3://<fresh bucket>` for one test."""
    return f"s3://{s3_server.new_bucket()}"


@pytest.fixture
def faulty_s3(s3_server, monkeypatch):
    """The S3 server behind tests/fault_proxy.py at 5 % injected faults (seeded): this process and every
    subprocess reach the server through the proxy; backoff is shortened so the tests stay quick."""
    from fault_proxy import FaultProxy
    proxy = FaultProxy(s3_server.endpoint, rate=0.05, seed=0)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("REPA_STORAGE_BACKOFF", "0.05")
    try:
        yield proxy
    finally:
        proxy.stop()
