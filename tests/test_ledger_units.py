"""The ledger's pure parts: [ledger] config, finality, the sacct summary and the rule that
another tool's text is never overwritten."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from slurm_netacct import config
from slurm_netacct.errors import ConfigError
from slurm_netacct.store import ledger, sacct

BASE = {"url": "mysql://netacct_ship@ledger.example.org/netacct", "password_file": "/etc/slurm/ledger.pw",
        "cluster": "alpha"}


def test_ledger_config_defaults_and_urls() -> None:
    led = config.parse({"ledger": BASE}).ledger
    assert led is not None
    assert str(led.url) == "mysql://netacct_ship@ledger.example.org:3306/netacct"
    assert (led.batch, led.interval, led.timeout, led.tls, led.sacct_field) == (500, 60, 30, "off", "SystemComment")
    sock = config.parse({"ledger": {**BASE, "url": "mysql://u@localhost/db?socket=/run/mysqld/mysqld.sock"}}).ledger
    assert sock is not None and sock.url.socket == "/run/mysqld/mysqld.sock"
    v6 = config.parse({"ledger": {**BASE, "url": "mysql://u@[fd00::1]:3307/db"}}).ledger
    assert v6 is not None and (v6.url.host, v6.url.port) == ("fd00::1", 3307)
    assert config.parse({}).ledger is None


@pytest.mark.parametrize("table, message", [
    ({"url": "mysql://u:secret@h/db"}, "config key 'ledger.url': the URL must not hold a password: put it in the password file"),
    ({"url": "postgres://u@h/db"}, "config key 'ledger.url': 'postgres://u@h/db' is not mysql://USER@HOST[:PORT]/DATABASE[?socket=PATH]"),
    ({"url": "mysql://u@h:0/db"}, "config key 'ledger.url': port 0 is out of range"),
    ({"cluster": "a b"}, "config key 'ledger.cluster': 'a b' is not a SLURM ClusterName (letters, digits, '_', '.', '-')"),
    ({"password_file": "ledger.pw"}, "config key 'ledger.password_file': 'ledger.pw' must be an absolute path"),
    ({"batch": 0}, "config key 'ledger.batch': must be an integer from 1 to 100000"),
    ({"tls": "yes"}, "config key 'ledger.tls': 'yes' is not one of off, required, verify_ca, verify_identity"),
    ({"tls": "verify_ca"}, "config key 'ledger.tls_ca': tls = 'verify_ca' needs the CA certificate (tls_ca)"),
    ({"tls_cert": "/c.pem"}, "config key 'ledger.tls_key': tls_cert and tls_key go together"),
    ({"sacct_field": "Extra"}, "config key 'ledger.sacct_field': 'Extra' is not one of SystemComment, AdminComment, Comment"),
    ({"colour": "red"}, "config key 'ledger.colour': unknown key"),
])
def test_ledger_config_errors(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config.parse({"ledger": {**BASE, **table}})
    assert str(exc.value) == message


def test_ledger_config_needs_url_password_file_and_cluster() -> None:
    for key in ("url", "password_file", "cluster"):
        with pytest.raises(ConfigError, match=f"config key 'ledger.{key}': is required in \\[ledger\\]"):
            config.parse({"ledger": {k: v for k, v in BASE.items() if k != key}})


def test_finality_sorts_as_the_report_rule() -> None:
    order = [ledger.finality("running", None, None), ledger.finality("running", None, "2026-11-01T00:00:00Z"),
             ledger.finality("running", None, "2026-11-02T00:00:00Z"), ledger.finality("lost", None, None),
             ledger.finality("completed", "2026-10-01T00:00:00Z", None),
             ledger.finality("reconciled", "2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z")]
    assert order == sorted(order) and len(set(order)) == len(order)


def test_password_file_rules(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret\nignored\n")
    os.chmod(pw, 0o600)
    if os.geteuid() == 0:
        assert ledger.read_password(pw) == "s3cret"
    os.chmod(pw, 0o640)
    with pytest.raises(ConfigError, match="is readable by others than root \\(mode 0640"):
        ledger.read_password(pw)
    with pytest.raises(ConfigError, match="No such file or directory"):
        ledger.read_password(tmp_path / "absent")


def test_summary_survives_what_slurm_22_05_does_to_it() -> None:
    text = sacct.summary({"wan": (5, 6), "lan": (1, 2), "site_b": (0, 0)})
    assert text == "na1:lan=1/2,site_b=0/0,wan=5/6"
    assert text == text.lower() and '"' not in text  # 22.05 lower-cases, turns " into `
    assert sacct.parse(text) == {"lan": (1, 2), "site_b": (0, 0), "wan": (5, 6)}
    assert sacct.parse(" " + text + "\n") == sacct.parse(text)


@pytest.mark.parametrize("current, ok", [
    ("", True), ("  ", True), ("na1:lan=1/2,wan=3/4", True),
    ("JS1:H4sIAAAAAAAAA", False), ("js1:h4siaaaa", False), ("site-note", False),
    ("na1:lan=1/2 site-note", False), ("site-note na1:lan=1/2", False), ("na1:", False),
])
def test_another_tools_text_is_never_overwritten(current: str, ok: bool) -> None:
    assert sacct.may_write(current) is ok
