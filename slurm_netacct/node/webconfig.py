"""The exporter's web config (TLS, basic auth): node_exporter's exporter-toolkit file, read and checked.

The format is the one node_exporter and the other Prometheus exporters read with
`--web.config.file` (prometheus/exporter-toolkit, docs/web-configuration.md), so a site can
reuse its file. What this module does not implement is refused by name, never ignored: a
setting that silently did nothing would be a security setting that lies.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import ssl
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import bcrypt
import yaml

from ..errors import ConfigError


class WebConfigError(ConfigError):
    """The exporter's web config file (or a certificate or key it names) is missing or invalid."""


TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version",
            "prefer_server_cipher_suites"}
# exporter-toolkit settings this exporter does not implement, and what to do instead.
UNSUPPORTED_TLS = {
    "cert": "put the certificate in a file and name it with cert_file",
    "key": "put the key in a file (mode 0600) and name it with key_file",
    "client_ca": "put the CA certificates in a file and name it with client_ca_file",
    "client_allowed_sans": "restrict clients with the CA that issues their certificates",
    "cipher_suites": "Python's ssl uses OpenSSL's default suites; remove the setting",
    "curve_preferences": "Python's ssl uses OpenSSL's default curves; remove the setting",
}
HTTP_KEYS = {"http2", "headers"}
HEADERS = ("Content-Security-Policy", "X-Frame-Options", "X-Content-Type-Options", "X-XSS-Protection",
           "Strict-Transport-Security")
TOP_KEYS = {"tls_server_config", "http_server_config", "basic_auth_users"}
UNSUPPORTED_TOP = {"rate_limit": "limit the scrapers with a firewall; remove the setting"}
TLS_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
                "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
CLIENT_AUTH = {"NoClientCert": ssl.CERT_NONE, "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
               "RequireAndVerifyClientCert": ssl.CERT_REQUIRED}
UNVERIFIED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert")
BCRYPT_HASH = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")


@dataclass
class WebConfig:
    """A checked web config: the TLS context to serve with (None: plain HTTP), the users and
    their bcrypt hashes (empty: no authentication), extra response headers."""

    path: Path
    tls: ssl.SSLContext | None = None
    client_certs_required: bool = False
    users: dict[str, bytes] = field(default_factory=dict)
    headers: list[tuple[str, str]] = field(default_factory=list)
    cert_not_after: datetime | None = None
    # user -> SHA-256 of (password, hash) last verified: bcrypt runs once per password, not per
    # scrape (as exporter-toolkit caches), and is compared in constant time.
    _verified: dict[str, bytes] = field(default_factory=dict, repr=False)
    # Checked when the user name is unknown, so that a wrong name costs as much time as a wrong
    # password: a hash of a random password, at the highest cost of the users' hashes.
    _dummy: bytes = field(default=b"", repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def authenticates(self) -> bool:
        """Whether every client must prove who it is (a password or a verified certificate)."""
        return bool(self.users) or self.client_certs_required

    def check(self, authorization: str | None) -> tuple[str | None, str]:
        """(user, '') if the Authorization header holds a configured user's password, else
        (None, why): why names the user at most, never the password."""
        if not authorization:
            return None, "no credentials"
        scheme, _, encoded = authorization.strip().partition(" ")
        if scheme.lower() != "basic":
            return None, "not basic authentication"
        try:
            user_s, sep, password_s = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None, "malformed basic authentication"
        if not sep:
            return None, "malformed basic authentication"
        password = password_s.encode()
        hashed = self.users.get(user_s)
        digest = hashlib.sha256(password + b"\0" + (hashed or self._dummy)).digest()
        with self._lock:
            known = self._verified.get(user_s)
        if hashed is not None and known is not None and hmac.compare_digest(known, digest):
            return user_s, ""
        # bcrypt.checkpw compares in constant time; an unknown user is checked against a dummy
        # hash so that the answer takes as long as for a known one.
        try:
            ok = bcrypt.checkpw(password, hashed or self._dummy) and hashed is not None
        except ValueError:  # bcrypt 5 refuses passwords over 72 bytes: no hash can match one
            ok = False
        if not ok:
            return None, f"unknown user {user_s[:64]!r}" if hashed is None else f"wrong password for user {user_s[:64]!r}"
        with self._lock:
            self._verified[user_s] = digest
        return user_s, ""


def _mapping(value: Any, where: str, path: Path) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise WebConfigError(f"web config {path}: {where} must be a mapping of names to values")
    return value


def _keys(d: dict[str, Any], known: set[str], unsupported: dict[str, str], where: str, path: Path) -> None:
    for key in d:
        if key in unsupported:
            raise WebConfigError(f"web config {path}: {where}{key} is not supported by netacct-exporter: "
                                 f"{unsupported[key]}")
        if key not in known:
            raise WebConfigError(f"web config {path}: unknown setting {where}{key}")


def _string(d: dict[str, Any], key: str, where: str, path: Path) -> str | None:
    value = d.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise WebConfigError(f"web config {path}: {where}{key} must be a non-empty string")
    return value


def _file(base: Path, name: str) -> Path:
    """A file named in the config: relative names are relative to the config's directory, as
    exporter-toolkit reads them."""
    p = Path(name)
    return p if p.is_absolute() else base / p


def _read(path: Path, what: str, config: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise WebConfigError(f"web config {config}: cannot read {what} {path}: {exc.strerror}") from None


def _der_validity(der: bytes) -> tuple[datetime, datetime]:
    """(notBefore, notAfter) of a DER X.509 certificate (RFC 5280: Certificate ->
    tbsCertificate -> [version], serialNumber, signature, issuer, validity); ValueError if
    the bytes are not one."""

    def tlv(pos: int) -> tuple[int, int, int]:
        tag, length = der[pos], der[pos + 1]
        pos += 2
        if length & 0x80:
            n = length & 0x7F
            length = int.from_bytes(der[pos:pos + n], "big")
            pos += n
        if pos + length > len(der):
            raise ValueError("truncated")
        return tag, pos, pos + length

    def time_of(pos: int) -> tuple[datetime, int]:
        tag, start, end = tlv(pos)
        text = der[start:end].decode("ascii")
        if tag == 0x17:  # UTCTime YYMMDDHHMMSSZ: years 50..99 are 19xx
            year = int(text[:2])
            text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
        elif tag != 0x18:  # GeneralizedTime YYYYMMDDHHMMSSZ
            raise ValueError("not a time")
        return datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=UTC), end

    tag, pos, _ = tlv(0)  # Certificate
    if tag != 0x30:
        raise ValueError("not a sequence")
    tag, pos, _ = tlv(pos)  # tbsCertificate
    if tag != 0x30:
        raise ValueError("not a sequence")
    if der[pos] == 0xA0:  # [0] version
        pos = tlv(pos)[2]
    for _ in range(3):  # serialNumber, signature, issuer
        pos = tlv(pos)[2]
    tag, pos, _ = tlv(pos)  # validity
    if tag != 0x30:
        raise ValueError("no validity")
    not_before, pos = time_of(pos)
    not_after, _ = time_of(pos)
    return not_before, not_after


def _check_certificate(cert_file: Path, config: Path, now: datetime) -> datetime:
    """The server certificate's notAfter; WebConfigError if it holds none or is not valid now."""
    text = _read(cert_file, "cert_file", config).decode("ascii", "replace")
    m = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", text, re.DOTALL)
    if not m:
        raise WebConfigError(f"web config {config}: cert_file {cert_file} holds no PEM certificate")
    try:
        not_before, not_after = _der_validity(ssl.PEM_cert_to_DER_cert(m.group(0)))
    except (ValueError, IndexError):
        raise WebConfigError(f"web config {config}: cert_file {cert_file}: not a valid certificate") from None
    stamp = "%Y-%m-%d %H:%M:%S UTC"
    if now > not_after:
        raise WebConfigError(f"web config {config}: cert_file {cert_file} expired on {not_after.strftime(stamp)}")
    if now < not_before:
        raise WebConfigError(f"web config {config}: cert_file {cert_file} is not valid before "
                             f"{not_before.strftime(stamp)}")
    return not_after


def _no_password() -> bytes:
    raise WebConfigError("encrypted")


def _tls(tls: dict[str, Any], config: Path, now: datetime) -> tuple[ssl.SSLContext, bool, datetime]:
    where = "tls_server_config."
    _keys(tls, TLS_KEYS, UNSUPPORTED_TLS, where, config)
    cert_s, key_s = _string(tls, "cert_file", where, config), _string(tls, "key_file", where, config)
    if cert_s is None or key_s is None:
        missing = "cert_file" if cert_s is None else "key_file"
        raise WebConfigError(f"web config {config}: tls_server_config needs both cert_file and key_file "
                             f"({missing} is missing)")
    base = config.parent
    cert_file, key_file = _file(base, cert_s), _file(base, key_s)
    not_after = _check_certificate(cert_file, config, now)
    key_text = _read(key_file, "key_file", config)  # a clear message for a missing or unreadable key
    if not re.search(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----", key_text):
        raise WebConfigError(f"web config {config}: key_file {key_file} holds no PEM private key")

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    versions = {}
    for key, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        name = _string(tls, key, where, config) or default
        if name not in TLS_VERSIONS:
            raise WebConfigError(f"web config {config}: {where}{key} {name!r} is not one of "
                                 f"{', '.join(TLS_VERSIONS)}")
        versions[key] = TLS_VERSIONS[name]
    if versions["min_version"] > versions["max_version"]:
        raise WebConfigError(f"web config {config}: {where}min_version is above max_version")
    try:
        ctx.minimum_version, ctx.maximum_version = versions["min_version"], versions["max_version"]
    except (ValueError, ssl.SSLError) as exc:
        raise WebConfigError(f"web config {config}: {where}min_version/max_version: {exc}") from None
    prefer = tls.get("prefer_server_cipher_suites", True)
    if not isinstance(prefer, bool):
        raise WebConfigError(f"web config {config}: {where}prefer_server_cipher_suites must be true or false")
    if prefer:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        ctx.load_cert_chain(cert_file, key_file, password=_no_password)
    except WebConfigError:
        raise WebConfigError(f"web config {config}: key_file {key_file} is encrypted: "
                             f"netacct-exporter needs it unencrypted (mode 0600)") from None
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise WebConfigError(f"web config {config}: key_file {key_file} is not the key of "
                                 f"cert_file {cert_file}") from None
        why = exc.reason or re.sub(r"^\[\w+\] | \(_ssl\.c:\d+\)$", "", str(exc))
        raise WebConfigError(f"web config {config}: cannot load cert_file {cert_file} with key_file "
                             f"{key_file}: {why}") from None
    except OSError as exc:
        raise WebConfigError(f"web config {config}: cannot load cert_file {cert_file} with key_file "
                             f"{key_file}: {exc.strerror or exc}") from None

    auth = _string(tls, "client_auth_type", where, config) or "NoClientCert"
    ca_s = _string(tls, "client_ca_file", where, config)
    if auth in UNVERIFIED_CLIENT_AUTH:
        raise WebConfigError(f"web config {config}: {where}client_auth_type {auth} accepts certificates "
                             f"nobody verified; use RequireAndVerifyClientCert")
    if auth not in CLIENT_AUTH:
        raise WebConfigError(f"web config {config}: {where}client_auth_type {auth!r} is not one of "
                             f"{', '.join(CLIENT_AUTH)}")
    ctx.verify_mode = CLIENT_AUTH[auth]
    if auth != "NoClientCert":
        if ca_s is None:
            raise WebConfigError(f"web config {config}: {where}client_auth_type {auth} needs client_ca_file")
        ca_file = _file(base, ca_s)
        _read(ca_file, "client_ca_file", config)
        try:
            ctx.load_verify_locations(cafile=ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise WebConfigError(f"web config {config}: cannot load client_ca_file {ca_file}: "
                                 f"{getattr(exc, 'reason', None) or exc}") from None
    elif ca_s is not None:
        raise WebConfigError(f"web config {config}: {where}client_ca_file is set but client_auth_type is "
                             f"NoClientCert: set it to RequireAndVerifyClientCert")
    return ctx, auth == "RequireAndVerifyClientCert", not_after


def load(path: Path, now: datetime | None = None) -> WebConfig:
    """Read and check the web config at path, with the certificate and key it names, as of
    now (default: the current time); WebConfigError (exit 3) with one line otherwise."""
    now = now or datetime.now(UTC)
    try:
        text = path.read_text()
    except OSError as exc:
        raise WebConfigError(f"web config {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise WebConfigError(f"web config {path}: not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or "not valid YAML"
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise WebConfigError(f"web config {path}: not valid YAML: {problem}{where}") from None
    top = _mapping(data, "the file", path)
    _keys(top, TOP_KEYS, UNSUPPORTED_TOP, "", path)
    web = WebConfig(path=path)

    tls = _mapping(top.get("tls_server_config"), "tls_server_config", path)
    if tls:
        web.tls, web.client_certs_required, web.cert_not_after = _tls(tls, path, now)

    http = _mapping(top.get("http_server_config"), "http_server_config", path)
    _keys(http, HTTP_KEYS, {}, "http_server_config.", path)
    if not isinstance(http.get("http2", True), bool):
        raise WebConfigError(f"web config {path}: http_server_config.http2 must be true or false")
    headers = _mapping(http.get("headers"), "http_server_config.headers", path)
    _keys(headers, set(HEADERS), {}, "http_server_config.headers.", path)
    for name, value in headers.items():
        if value is None or value == "":
            continue  # unset, as exporter-toolkit reads a blank one
        if not isinstance(value, str) or not value.isprintable():
            raise WebConfigError(f"web config {path}: http_server_config.headers.{name} must be one line of text")
        web.headers.append((name, value))

    users = _mapping(top.get("basic_auth_users"), "basic_auth_users", path)
    for user, hashed in users.items():
        if not user or ":" in user or not user.isprintable():
            raise WebConfigError(f"web config {path}: basic_auth_users: {user[:64]!r} is not a valid user name "
                                 f"(non-empty, no ':')")
        if not isinstance(hashed, str) or not BCRYPT_HASH.fullmatch(hashed):
            raise WebConfigError(f"web config {path}: basic_auth_users: the password of {user!r} is not a "
                                 f"bcrypt hash (make one with: htpasswd -nBC 10 \"\" | tr -d ':\\n')")
        web.users[user] = hashed.encode()
    if web.users:
        cost = max(int(h[4:6]) for h in web.users.values())
        web._dummy = bcrypt.hashpw(secrets.token_hex(16).encode(), bcrypt.gensalt(cost))
    return web
