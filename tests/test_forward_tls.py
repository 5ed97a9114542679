"""DICOM over TLS to a destination: mutual authentication with certificates made by openssl for
the test, a pynetdicom Storage SCP that requires them, and a destination with the wrong CA that
must not get the instance (it stays queued, never counted as delivered), and one whose CA file is
missing (it stays queued, with the reason)."""

from __future__ import annotations

import json
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt

from .corpus import Series, write_series
from .peers import free_port, require_tool, storescu


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, both signed by it;
    and a second, unrelated CA."""
    require_tool("openssl")
    d = tmp_path / "pki"
    d.mkdir()
    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={ca}",
                "-keyout", f"{ca}.key", "-out", f"{ca}.crt", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                "-out", f"{name}.csr", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-extfile", "san.ext", "-out", f"{name}.crt", cwd=d)
    return d


def test_forwarding_over_mutual_tls(appliance_factory, pki: Path, tmp_path: Path) -> None:
    received: list[str] = []
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.crt"))
    context.verify_mode = ssl.CERT_REQUIRED  # the PACS only talks to boxes with our client certificate
    context.load_cert_chain(pki / "server.crt", pki / "server.key")
    ae = AE(ae_title="TLSPACS")
    ae.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, ssl_context=context,
                             evt_handlers=[(evt.EVT_C_STORE, lambda e: received.append(
                                 str(e.request.AffectedSOPInstanceUID)) or 0x0000)])
    try:
        destination = {"ae_title": "TLSPACS", "host": "127.0.0.1", "port": port,
                       "retry": {"initial_delay": "1s", "max_delay": "2s"},
                       "timeouts": {"connect": "3s", "acse": "5s", "dimse": "10s", "network": "10s"}}
        box = appliance_factory({
            "destinations": {
                "secure": {**destination, "tls": {"ca": str(pki / "ca.crt"), "cert": str(pki / "client.crt"),
                                                  "key": str(pki / "client.key")}},
                "impostor": {**destination, "tls": {"ca": str(pki / "other-ca.crt"), "cert": str(pki / "client.crt"),
                                                    "key": str(pki / "client.key")}},
                # A CA file that is not there (a typo, a file not copied onto the box).
                "misconfigured": {**destination, "tls": {"ca": str(pki / "missing-ca.crt")}},
            },
            "routes": [{"send_to": ["secure", "impostor", "misconfigured"]}],
        })
        files = write_series(tmp_path / "ct", "tls", 1, 1, Series("CT", 3, 64, 64))
        assert not storescu(box.port, files).failed

        deadline = time.monotonic() + 30
        while len(received) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # the impostor destination gets its tries meanwhile
        queue = {d["name"]: d for d in json.loads(box.cli("queue", "--json").stdout)["destinations"]}
        assert queue["secure"]["delivered"] == 3
        assert len(received) == 3, "only the destination whose certificate verifies may receive"
        assert queue["impostor"]["delivered"] == 0
        assert queue["impostor"]["pending"] + queue["impostor"]["in_flight"] == 3
        # The reason an admin can act on: the PACS's certificate is not from the CA configured.
        assert "TLS with TLSPACS@127.0.0.1:" in (queue["impostor"]["last_error"] or ""), queue["impostor"]
        assert "CERTIFICATE_VERIFY_FAILED" in (queue["impostor"]["last_error"] or ""), queue["impostor"]
        # A TLS set-up that fails waits with the reason, like a destination that is down; it
        # neither becomes a dead letter nor stops the forwarder (which served "secure").
        assert queue["misconfigured"]["pending"] + queue["misconfigured"]["in_flight"] == 3
        assert "cannot set up TLS for TLSPACS" in (queue["misconfigured"]["last_error"] or "")
        assert "to be started again" not in box.log_path.read_text()
    finally:
        server.shutdown()
