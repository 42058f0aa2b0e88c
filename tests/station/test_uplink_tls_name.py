"""A broker name with several addresses is connected to address by address (issue #19):
the TLS check must still be against the name, never against the address the socket
went to (paho passes the address it was given as server_hostname)."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import pytest

from agent.config import load_config
from agent.station.uplink import tls_context
from tests.support.pki import TestCA


def serve_once(ca: TestCA, tmp: Path, name: str) -> tuple[int, threading.Thread]:
    """A TLS server on loopback whose certificate is for `name` (and 127.0.0.1)."""
    cert, key = ca.identity(name, tmp / "server", server=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def accept() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                try:
                    with ctx.wrap_socket(conn, server_side=True) as tls:
                        tls.recv(1)
                except (ssl.SSLError, OSError):
                    pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    return port, t


@pytest.mark.parametrize(
    ("verify_name", "ok"),
    [("localhost", True), ("broker.city.test", False), (None, True)],
)
def test_the_certificate_is_checked_against_the_broker_name(
    tmp_path: Path, verify_name: str | None, ok: bool
) -> None:
    ca = TestCA()
    ca_file = ca.write(tmp_path / "ca.crt")
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'[agent]\nsite = "s"\nname = "a"\n[mqtt]\nhost = "localhost"\ntls_ca = "{ca_file}"\n'
    )
    ctx = tls_context(load_config(cfg))
    assert ctx is not None
    ctx.verify_name = verify_name
    port, server = serve_once(ca, tmp_path, "localhost")  # SAN: localhost, 127.0.0.1
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        if ok:  # None: the address itself is checked, as before (it is in the SAN)
            with ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"x")
        else:  # the certificate is for 127.0.0.1 but not for the name we asked for
            with pytest.raises(ssl.SSLCertVerificationError, match=r"broker\.city\.test"):
                ctx.wrap_socket(sock, server_hostname="127.0.0.1")
    server.join(5)
