"""The exporter on the network: HTTPS and basic auth from a node_exporter web config, the refusal
to serve beyond loopback without them, and real scrapes over the sandbox LAN.

Certificates come from a CA the tests make with the openssl command. The scrapes that cross a
network run in the sandbox: the exporter in the node's namespace, the scraper (tests/scrape.py)
in the LAN server's, as Prometheus would scrape a compute node. The others use loopback.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, VENV_BIN, Node
from slurm_netacct import config
from slurm_netacct.errors import ConfigError, UsageError
from slurm_netacct.node import exporter, webconfig
from slurm_netacct.node.webconfig import WebConfigError

NODE = "n1"
PASSWORD = "correct horse battery staple"
SCRAPE = str(ROOT / "tests" / "scrape.py")


# --------------------------------------------------------------------------- certificates

@dataclass
class Certs:
    dir: Path
    ca: Path           # the CA that signed srv, expired and client
    other_ca: Path     # a CA that signed nothing here: a client trusting only it must refuse
    srv_crt: Path      # SAN: 10.77.1.2 (the sandbox node), 127.0.0.1, ::1, localhost
    srv_key: Path
    other_key: Path    # a key that is not srv_crt's
    expired_crt: Path  # srv_key's, expired yesterday
    encrypted_key: Path
    client_crt: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    r = subprocess.run(["openssl", *args], capture_output=True, text=True, cwd=cwd)
    assert r.returncode == 0, f"openssl {' '.join(args)}: {r.stderr}"


def _key(name: str, cwd: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", name, cwd=cwd)


def _sign(name: str, key: str, days: str, ext: str, cwd: Path) -> None:
    _openssl("req", "-new", "-key", key, "-subj", f"/CN={name}", "-out", f"{name}.csr", cwd=cwd)
    (cwd / f"{name}.ext").write_text(ext + "\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", days, "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=cwd)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    d = tmp_path_factory.mktemp("certs")
    for ca in ("ca", "other-ca"):
        _key(f"{ca}.key", d)
        _openssl("req", "-x509", "-new", "-key", f"{ca}.key", "-subj", f"/CN=netacct test {ca}", "-days", "2",
                 "-out", f"{ca}.crt", cwd=d)
    for key in ("srv.key", "other.key", "client.key"):
        _key(key, d)
    _sign("srv", "srv.key", "2", "subjectAltName=IP:10.77.1.2,IP:127.0.0.1,IP:::1,DNS:localhost", d)
    _sign("expired", "srv.key", "-1", "subjectAltName=IP:127.0.0.1", d)  # notAfter: a day ago
    _sign("client", "client.key", "2", "extendedKeyUsage=clientAuth", d)
    _openssl("pkey", "-in", "srv.key", "-aes256", "-passout", "pass:secret", "-out", "encrypted.key", cwd=d)
    return Certs(d, d / "ca.crt", d / "other-ca.crt", d / "srv.crt", d / "srv.key", d / "other.key",
                 d / "expired.crt", d / "encrypted.key", d / "client.crt", d / "client.key")


def _hash(password: str, cost: int = 4) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost)).decode()


def _web(path: Path, data: Any) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _secure(certs: Certs, password: str = PASSWORD, **tls: Any) -> dict[str, Any]:
    return {"tls_server_config": {"cert_file": str(certs.srv_crt), "key_file": str(certs.srv_key), **tls},
            "basic_auth_users": {"prom": _hash(password)}}


# --------------------------------------------------------------------------- the web config

def test_a_node_exporter_web_config_is_read_with_paths_relative_to_it(certs: Certs) -> None:
    """The file node_exporter's docs show (relative names: from the file's directory)."""
    path = _web(certs.dir / "web.yml", f"""\
tls_server_config:
  cert_file: srv.crt
  key_file: srv.key
  min_version: TLS13
http_server_config:
  http2: true
  headers:
    X-Frame-Options: deny
    X-XSS-Protection: ""
basic_auth_users:
  prometheus: {_hash(PASSWORD, 10).replace("$2b$", "$2y$")}
""")
    web = webconfig.load(path)
    assert web.tls is not None and web.tls.minimum_version == ssl.TLSVersion.TLSv1_3
    assert web.tls.verify_mode == ssl.CERT_NONE and not web.client_certs_required
    assert list(web.users) == ["prometheus"] and web.authenticates
    assert web.headers == [("X-Frame-Options", "deny")]
    assert web.cert_not_after is not None and timedelta(days=1) < web.cert_not_after - datetime.now(UTC) <= timedelta(days=2)
    # htpasswd's $2y$ hashes work; a password is checked once by bcrypt, then from the cache
    auth = "Basic " + base64.b64encode(f"prometheus:{PASSWORD}".encode()).decode()
    assert web.check(auth) == ("prometheus", "")
    assert web.check(auth) == ("prometheus", "")
    empty = webconfig.load(_web(certs.dir / "empty.yml", ""))
    assert (empty.tls, empty.users, empty.authenticates) == (None, {}, False)


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize("header, why", [
    (None, "no credentials"),
    ("Bearer abc", "not basic authentication"),
    ("Basic !!!", "malformed basic authentication"),
    ("Basic " + base64.b64encode(b"nocolon").decode(), "malformed basic authentication"),
    (_basic("prom", "wrong"), "wrong password for user 'prom'"),
    (_basic("prom", PASSWORD + "x"), "wrong password for user 'prom'"),
    (_basic("prom", "x" * 100), "wrong password for user 'prom'"),  # bcrypt 5 refuses > 72 bytes
    (_basic("root", PASSWORD), "unknown user 'root'"),
    (_basic("prom\nINFO fake", PASSWORD), "unknown user 'prom\\nINFO fake'"),
])
def test_credentials_that_do_not_match_are_refused_naming_no_password(certs: Certs, header: str | None,
                                                                      why: str) -> None:
    web = webconfig.load(_web(certs.dir / "auth.yml", _secure(certs)))
    assert web.check(_basic("prom", PASSWORD)) == ("prom", "")  # (fills the cache first)
    assert web.check(header) == (None, why)
    assert PASSWORD not in why and "wrong" not in why.replace("wrong password", "")


def test_an_unknown_user_costs_as_much_bcrypt_as_a_known_one(certs: Certs) -> None:
    """The dummy hash an unknown name is checked against has the users' cost."""
    web = webconfig.load(_web(certs.dir / "cost.yml", {"basic_auth_users": {"prom": _hash(PASSWORD, 10)}}))
    assert web._dummy.startswith(b"$2b$10$")

    def took(header: str) -> float:
        t = time.perf_counter()
        assert web.check(header)[0] is None
        return time.perf_counter() - t

    known = min(took(_basic("prom", "wrong")) for _ in range(3))
    unknown = min(took(_basic("nobody", "wrong")) for _ in range(3))
    assert known > 0.01 and 0.5 < unknown / known < 2, (known, unknown)


def _bad_cases(c: Certs) -> list[tuple[Any, str]]:
    ok = {"cert_file": str(c.srv_crt), "key_file": str(c.srv_key)}
    return [
        ("tls_server_config: [unclosed", "not valid YAML: expected ',' or ']', but got '<stream end>' (line 1, column 29)"),
        ("- a list", "the file must be a mapping of names to values"),
        ({"tls_config": ok}, "unknown setting tls_config"),
        ({"rate_limit": {"interval": "1s"}}, "rate_limit is not supported by netacct-exporter: limit the "
                                             "scrapers with a firewall; remove the setting"),
        ({"tls_server_config": {**ok, "cipher_suites": ["TLS_AES_128_GCM_SHA256"]}},
         "tls_server_config.cipher_suites is not supported by netacct-exporter: Python's ssl uses OpenSSL's "
         "default suites; remove the setting"),
        ({"tls_server_config": {"cert_file": str(c.srv_crt)}},
         "tls_server_config needs both cert_file and key_file (key_file is missing)"),
        ({"tls_server_config": {**ok, "cert_file": str(c.dir / "nope.crt")}},
         f"cannot read cert_file {c.dir / 'nope.crt'}: No such file or directory"),
        ({"tls_server_config": {**ok, "key_file": str(c.dir / "nope.key")}},
         f"cannot read key_file {c.dir / 'nope.key'}: No such file or directory"),
        ({"tls_server_config": {**ok, "key_file": str(c.dir)}},
         f"cannot read key_file {c.dir}: Is a directory"),
        ({"tls_server_config": {**ok, "cert_file": str(c.srv_key)}},
         f"cert_file {c.srv_key} holds no PEM certificate"),
        ({"tls_server_config": {**ok, "key_file": str(c.other_key)}},
         f"key_file {c.other_key} is not the key of cert_file {c.srv_crt}"),
        ({"tls_server_config": {**ok, "key_file": str(c.srv_crt)}},
         f"key_file {c.srv_crt} holds no PEM private key"),
        ({"tls_server_config": {**ok, "key_file": str(c.encrypted_key)}},
         f"key_file {c.encrypted_key} is encrypted: netacct-exporter needs it unencrypted (mode 0600)"),
        ({"tls_server_config": {**ok, "min_version": "TLS14"}},
         "tls_server_config.min_version 'TLS14' is not one of TLS10, TLS11, TLS12, TLS13"),
        ({"tls_server_config": {**ok, "min_version": "TLS13", "max_version": "TLS12"}},
         "tls_server_config.min_version is above max_version"),
        ({"tls_server_config": {**ok, "client_auth_type": "RequireAnyClientCert"}},
         "tls_server_config.client_auth_type RequireAnyClientCert accepts certificates nobody verified; "
         "use RequireAndVerifyClientCert"),
        ({"tls_server_config": {**ok, "client_auth_type": "RequireAndVerifyClientCert"}},
         "tls_server_config.client_auth_type RequireAndVerifyClientCert needs client_ca_file"),
        ({"tls_server_config": {**ok, "client_ca_file": str(c.ca)}},
         "tls_server_config.client_ca_file is set but client_auth_type is NoClientCert: set it to "
         "RequireAndVerifyClientCert"),
        ({"http_server_config": {"headers": {"Server": "x"}}}, "unknown setting http_server_config.headers.Server"),
        ({"basic_auth_users": {"prom": "s3cret"}},
         "basic_auth_users: the password of 'prom' is not a bcrypt hash (make one with: htpasswd -nBC 10 \"\" "
         "| tr -d ':\\n')"),
        ({"basic_auth_users": {"a:b": _hash("x")}}, "basic_auth_users: 'a:b' is not a valid user name (non-empty, no ':')"),
        ({"basic_auth_users": ["prom"]}, "basic_auth_users must be a mapping of names to values"),
    ]


def test_a_bad_web_config_is_one_line_naming_the_file_and_the_setting(certs: Certs) -> None:
    for i, (data, msg) in enumerate(_bad_cases(certs)):
        path = _web(certs.dir / f"bad{i}.yml", data)
        with pytest.raises(WebConfigError) as err:
            webconfig.load(path)
        assert str(err.value) == f"web config {path}: {msg}", data
        assert err.value.exit_code == 3 and isinstance(err.value, ConfigError)
    missing = certs.dir / "missing.yml"
    with pytest.raises(WebConfigError, match=f"^web config {missing}: No such file or directory$"):
        webconfig.load(missing)


def test_an_expired_or_not_yet_valid_certificate_is_refused(certs: Certs) -> None:
    end = subprocess.run(["openssl", "x509", "-in", str(certs.expired_crt), "-noout", "-enddate"],
                         capture_output=True, text=True, check=True).stdout.strip().removeprefix("notAfter=")
    end_s = datetime.strptime(end, "%b %d %H:%M:%S %Y %Z").strftime("%Y-%m-%d %H:%M:%S UTC")
    path = _web(certs.dir / "expired.yml", {"tls_server_config": {"cert_file": "expired.crt", "key_file": "srv.key"}})
    with pytest.raises(WebConfigError) as err:
        webconfig.load(path)
    assert str(err.value) == f"web config {path}: cert_file {certs.expired_crt} expired on {end_s}"
    # the good certificate, seen from the day before it was made
    path = _web(certs.dir / "early.yml", _secure(certs))
    with pytest.raises(WebConfigError, match=rf"^web config {path}: cert_file {certs.srv_crt} is not valid "
                                             r"before \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$"):
        webconfig.load(path, now=datetime.now(UTC) - timedelta(days=1))


def test_the_validity_is_read_from_the_certificate_as_openssl_reads_it(certs: Certs) -> None:
    for crt in (certs.srv_crt, certs.expired_crt, certs.ca, certs.client_crt):
        dates = subprocess.run(["openssl", "x509", "-in", str(crt), "-noout", "-dates"], capture_output=True,
                               text=True, check=True).stdout.splitlines()
        want = [datetime.strptime(d.split("=", 1)[1], "%b %d %H:%M:%S %Y %Z").replace(tzinfo=UTC) for d in dates]
        der = ssl.PEM_cert_to_DER_cert(crt.read_text())
        assert list(webconfig._der_validity(der)) == want


# --------------------------------------------------------------------------- beyond loopback

@pytest.mark.parametrize("addr, secure, refused", [
    ("127.0.0.1", False, False), ("127.0.0.53", False, False), ("::1", False, False), ("localhost", False, False),
    ("0.0.0.0", False, True), ("::", False, True), ("10.77.1.2", False, True),
    ("0.0.0.0", True, False), ("10.77.1.2", True, False),
])
def test_only_loopback_may_go_without_tls_and_authentication(certs: Certs, addr: str, secure: bool,
                                                             refused: bool) -> None:
    web = webconfig.load(_web(certs.dir / "secure.yml", _secure(certs))) if secure else None
    if refused:
        with pytest.raises(exporter.InsecureListenError) as err:
            exporter.check_exposure(addr, web, insecure=False)
        assert isinstance(err.value, UsageError) and err.value.exit_code == 2
    else:
        exporter.check_exposure(addr, web, insecure=False)
    exporter.check_exposure(addr, web, insecure=True)  # said explicitly: always allowed


def test_tls_alone_or_a_password_alone_is_not_enough_beyond_loopback(certs: Certs) -> None:
    tls_only = webconfig.load(_web(certs.dir / "tls.yml", {"tls_server_config": _secure(certs)["tls_server_config"]}))
    auth_only = webconfig.load(_web(certs.dir / "pw.yml", {"basic_auth_users": {"prom": _hash(PASSWORD)}}))
    with pytest.raises(exporter.InsecureListenError, match="without authentication"):
        exporter.check_exposure("0.0.0.0", tls_only, insecure=False)
    with pytest.raises(exporter.InsecureListenError, match=r"without TLS \(tls_server_config\):"):
        exporter.check_exposure("0.0.0.0", auth_only, insecure=False)
    certs_only = webconfig.load(_web(certs.dir / "mtls.yml", {"tls_server_config": {
        **_secure(certs)["tls_server_config"], "client_auth_type": "RequireAndVerifyClientCert",
        "client_ca_file": "ca.crt"}}))
    exporter.check_exposure("0.0.0.0", certs_only, insecure=False)  # a verified client certificate is enough


# --------------------------------------------------------------------------- the command line

def _env(tmp: Path) -> dict[str, str]:
    cfg = tmp / "netacct.toml"
    cfg.write_text(f'db = "{tmp}/netacct.db"\nlog_file = "{tmp}/netacct.log"\nspool_dir = "{tmp}/spool"\n')
    return dict(os.environ, NETACCT_CONFIG=str(cfg), SLURMD_NODENAME=NODE)


def _cli(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VENV_BIN / "netacct-exporter"), *args], capture_output=True, text=True,
                          env=_env(tmp), timeout=60, cwd="/")


def test_the_command_refuses_to_listen_beyond_loopback_without_being_told(certs: Certs, tmp_path: Path) -> None:
    for listen, shown in (("9835", "0.0.0.0"), ("[::]:9835", "[::]")):
        r = _cli(tmp_path, "--listen", listen)
        assert (r.returncode, r.stdout) == (2, "")
        assert r.stderr == (f"netacct-exporter: refusing to serve every running job's user and account on {shown}, "
                            f"beyond loopback, without TLS (tls_server_config) and authentication "
                            f"(basic_auth_users or client_auth_type RequireAndVerifyClientCert): give them in "
                            f"--web-config FILE, or pass --insecure-listen\n")
    for flag in (["--web-config", "/x.yml"], ["--insecure-listen"]):
        r = _cli(tmp_path, "--textfile", str(tmp_path / "m.prom"), *flag)
        assert (r.returncode, r.stdout) == (2, "")
        assert r.stderr == f"netacct-exporter: {flag[0]} goes with --listen, not --textfile\n"


def test_the_command_exits_3_on_a_bad_web_config_before_listening(certs: Certs, tmp_path: Path) -> None:
    picked = ("not valid YAML", "Is a directory", "is not the key of")  # (the library test has them all)
    cases = [(data, msg) for data, msg in _bad_cases(certs) if any(p in msg for p in picked)]
    assert len(cases) == len(picked)
    for i, (data, msg) in enumerate(cases):
        path = _web(tmp_path / f"bad{i}.yml", data)
        r = _cli(tmp_path, "--listen", "127.0.0.1:0", "--web-config", str(path))
        assert (r.returncode, r.stdout, r.stderr) == (3, "", f"netacct-exporter: web config {path}: {one_line(msg)}\n")
    path = _web(tmp_path / "expired.yml", {"tls_server_config": {"cert_file": str(certs.expired_crt),
                                                                 "key_file": str(certs.srv_key)}})
    r = _cli(tmp_path, "--listen", "0.0.0.0:0", "--web-config", str(path))
    assert r.returncode == 3 and re.fullmatch(rf"netacct-exporter: web config {path}: cert_file "
                                              rf"{certs.expired_crt} expired on [-0-9: ]+ UTC\n", r.stderr)


def one_line(text: str) -> str:
    return text.replace("\n", "\\n")


# --------------------------------------------------------------------------- loopback scrapes

def _get(url: str, ca: Path | None = None, auth: str | None = None) -> tuple[int, dict[str, str], str]:
    ctx = ssl.create_default_context(cafile=str(ca)) if ca else None
    req = urllib.request.Request(url, headers={"Authorization": auth} if auth else {})
    try:
        with urllib.request.urlopen(req, timeout=20, context=ctx) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


def test_library_serves_https_with_basic_auth_on_loopback(certs: Certs, tmp_path: Path) -> None:
    cfg = config.load(Path(_env(tmp_path)["NETACCT_CONFIG"]))
    data = _secure(certs)
    data["http_server_config"] = {"headers": {"X-Content-Type-Options": "nosniff"}}
    web = webconfig.load(_web(tmp_path / "web.yml", data))
    server, thread = exporter.serve(cfg, NODE, "::1", 0, web=web)
    try:
        port = server.server_address[1]
        url = f"https://[::1]:{port}/metrics"
        status, headers, body = _get(url, certs.ca, _basic("prom", PASSWORD))
        assert status == 200 and headers["X-Content-Type-Options"] == "nosniff"
        assert [(s.name, s.value) for f in text_string_to_metric_families(body) for s in f.samples] == [
            ("netacct_jobs_running", 0.0), ("netacct_job_read_errors", 0.0)]
        status, headers, body = _get(url, certs.ca)
        assert (status, body) == (401, "Unauthorized\n") and headers["X-Content-Type-Options"] == "nosniff"
        assert headers["WWW-Authenticate"] == 'Basic realm="netacct-exporter", charset="UTF-8"'
        assert _get(f"http://[::1]:{port}/metrics")[::2] == (400, "Client sent an HTTP request to an HTTPS server.\n")
        # a client that connects and says nothing holds up no one: the handshake is its thread's
        with socket.create_connection(("::1", port)):
            t = time.monotonic()
            assert _get(url, certs.ca, _basic("prom", PASSWORD))[0] == 200
            assert time.monotonic() - t < 2
        # the server's certificate is checked against the CA that signed it, and only that one
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            _get(url, certs.other_ca, _basic("prom", PASSWORD))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert not thread.is_alive()


# --------------------------------------------------------------------------- over the sandbox LAN

@contextmanager
def _exporter(node: Node, *args: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """netacct-exporter running in the sandbox node's namespace: (process, port it serves)."""
    env = dict(os.environ, NETACCT_CONFIG=str(node.config_path), SLURMD_NODENAME=NODE)
    proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{node.topo.node}", str(VENV_BIN / "netacct-exporter"),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd="/")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.fullmatch(r"netacct-exporter: serving https?://[^ ]+:(\d+)/metrics for node n1.*\n", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
        yield proc, int(m.group(1))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _scrape(node: Node, url: str, *args: str) -> dict[str, Any]:
    """GET url from the LAN server's namespace (as a Prometheus server on the cluster LAN)."""
    r = subprocess.run(["nsenter", f"--net=/run/netns/{node.topo.lan}", sys.executable, SCRAPE, url, *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _job_series(body: str) -> set[tuple[str, str, str]]:
    """(job_id, user, account) of every netacct_job_bytes_total series."""
    return {(s.labels["job_id"], s.labels["user"], s.labels["account"])
            for f in text_string_to_metric_families(body) for s in f.samples
            if s.name == "netacct_job_bytes_total"}


def test_scrapes_over_the_lan_with_and_without_credentials(bpf_node: Node, certs: Certs, tmp_path: Path) -> None:
    job = 6140
    bpf_node.prolog(job)
    node4 = bpf_node.topo.node_addr(0)
    web = _web(tmp_path / "web.yml", _secure(certs))
    ca = ["--ca", str(certs.ca)]
    with _exporter(bpf_node, "--listen", f"{node4}:0", "--web-config", str(web)) as (proc, port):
        url = f"https://{node4}:{port}/metrics"
        ok = _scrape(bpf_node, url, *ca, "--user", "prom", "--password", PASSWORD)
        assert ok["status"] == 200 and _job_series(ok["body"]) == {(str(job), "alice", "physics")}
        for creds in ([], ["--user", "prom", "--password", "wrong"], ["--user", "root", "--password", PASSWORD]):
            r = _scrape(bpf_node, url, *ca, *creds)
            assert (r["status"], r["body"]) == (401, "Unauthorized\n"), creds
        r = _scrape(bpf_node, f"http://{node4}:{port}/metrics")
        assert (r["status"], r["body"]) == (400, "Client sent an HTTP request to an HTTPS server.\n")
        r = _scrape(bpf_node, url, "--ca", str(certs.other_ca), "--user", "prom", "--password", PASSWORD)
        assert "CERTIFICATE_VERIFY_FAILED" in r["error"]

        # SIGHUP: the file is read again (a new password); a broken file keeps the one in force
        _web(web, _secure(certs, password="new password"))
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while _scrape(bpf_node, url, *ca, "--user", "prom", "--password", "new password")["status"] != 200:
            assert time.monotonic() < deadline, "the web config was not reloaded"
            time.sleep(0.2)
        assert _scrape(bpf_node, url, *ca, "--user", "prom", "--password", PASSWORD)["status"] == 401
        _web(web, {"basic_auth_users": {"prom": "plain"}})
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "not reloaded" not in bpf_node.log.read_text():
            assert time.monotonic() < deadline, "the broken web config was not read"
            time.sleep(0.2)
        assert _scrape(bpf_node, url, *ca, "--user", "prom", "--password", "new password")["status"] == 200
    assert proc.returncode == 0
    assert proc.stderr is not None
    assert proc.stderr.read() == (f"netacct-exporter: web config not reloaded, the previous one stays in force: "
                                  f"web config {web}: basic_auth_users: the password of 'prom' is not a bcrypt hash "
                                  f"(make one with: htpasswd -nBC 10 \"\" | tr -d ':\\n')\n")
    log = bpf_node.log.read_text()
    assert "scrape from 10.77.0.10 refused: wrong password for user 'prom'" in log
    assert "scrape from 10.77.0.10 refused: no credentials" in log
    assert "scrape from 10.77.0.10 refused: unknown user 'root'" in log
    assert "plain HTTP on the HTTPS port" in log
    # the test certificate is valid for 2 days: the start and the reload warn that it expires soon
    assert len(re.findall(rf"WARNING web config {web}: the certificate expires on [-0-9: ]+ UTC, in 1 day: "
                          r"renew it, then reload \(SIGHUP\)", log)) == 2
    for secret in (PASSWORD, "new password", "wrong"):
        assert secret not in log.replace("wrong password for", "")
    bpf_node.epilog(job)


def test_client_certificates_or_an_explicit_flag_beyond_loopback(bpf_node: Node, certs: Certs,
                                                                 tmp_path: Path) -> None:
    job = 6141
    bpf_node.prolog(job, SLURM_JOB_USER="bob", SLURM_JOB_ACCOUNT="chem")
    node4 = bpf_node.topo.node_addr(0)
    env = dict(os.environ, NETACCT_CONFIG=str(bpf_node.config_path), SLURMD_NODENAME=NODE)
    r = subprocess.run(["nsenter", f"--net=/run/netns/{bpf_node.topo.node}", str(VENV_BIN / "netacct-exporter"),
                        "--listen", f"{node4}:0"], capture_output=True, text=True, env=env, timeout=60)
    assert (r.returncode, r.stdout) == (2, "") and r.stderr.startswith(
        "netacct-exporter: refusing to serve every running job's user and account on 10.77.1.2, beyond loopback")

    with _exporter(bpf_node, "--listen", f"{node4}:0", "--insecure-listen") as (_, port):
        r = _scrape(bpf_node, f"http://{node4}:{port}/metrics")
        assert r["status"] == 200 and _job_series(r["body"]) == {(str(job), "bob", "chem")}

    mtls = _web(tmp_path / "mtls.yml", {"tls_server_config": {
        "cert_file": str(certs.srv_crt), "key_file": str(certs.srv_key),
        "client_auth_type": "RequireAndVerifyClientCert", "client_ca_file": str(certs.ca)}})
    with _exporter(bpf_node, "--listen", f"{node4}:0", "--web-config", str(mtls)) as (_, port):
        url = f"https://{node4}:{port}/metrics"
        r = _scrape(bpf_node, url, "--ca", str(certs.ca), "--cert", str(certs.client_crt),
                    "--key", str(certs.client_key))
        assert r["status"] == 200 and _job_series(r["body"]) == {(str(job), "bob", "chem")}
        r = _scrape(bpf_node, url, "--ca", str(certs.ca))  # no client certificate: no TLS session
        assert "error" in r and "status" not in r, r
    bpf_node.epilog(job)


def test_the_example_web_config_loads_once_its_placeholders_are_filled_in(certs: Certs, tmp_path: Path) -> None:
    example = (ROOT / "contrib" / "web-config.yml.example").read_text()
    as_shipped = _web(tmp_path / "shipped.yml", example.replace("/etc/slurm/netacct-exporter.crt", str(certs.srv_crt))
                      .replace("/etc/slurm/netacct-exporter.key", str(certs.srv_key)))
    with pytest.raises(WebConfigError, match="the password of 'prometheus' is not a bcrypt hash"):
        webconfig.load(as_shipped)  # the placeholder is refused: no site runs with a known password
    filled = _web(tmp_path / "filled.yml", as_shipped.read_text().replace("REPLACE-WITH-A-BCRYPT-HASH", _hash(PASSWORD)))
    web = webconfig.load(filled)
    assert web.tls is not None and list(web.users) == ["prometheus"]
    exporter.check_exposure("0.0.0.0", web, insecure=False)
