"""A throwaway MariaDB server for the ledger's tests and benchmarks: its own data directory,
socket and TCP port, optionally inside a network namespace of its own; stopped by PID.

Debian's mariadb-server package provides the binaries (scripts/bootstrap installs it without
starting its service); nothing here touches the machine's own MariaDB, if it has one.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path


def sh(*argv: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), input=input, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip()}")
    return proc


class LedgerNet:
    """Two namespaces joined by a veth pair: `<tag>db` (10.78.0.1, the server) and `<tag>cl`
    (10.78.0.2, where shipping clients run). Cut the link with `cut()`, mend it with `mend()`."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.db = f"{tag}db"
        self.client = f"{tag}cl"
        self.server_addr = "10.78.0.1"
        self.client_addr = "10.78.0.2"

    def up(self) -> "LedgerNet":
        try:
            for ns in (self.db, self.client):
                sh("ip", "netns", "add", ns)
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", self.db, "link", "add", "ldb0", "type", "veth", "peer", "name", "lcl0",
               "netns", self.client)
            sh("ip", "-n", self.db, "addr", "add", f"{self.server_addr}/24", "dev", "ldb0")
            sh("ip", "-n", self.client, "addr", "add", f"{self.client_addr}/24", "dev", "lcl0")
            self.mend()
        except BaseException:
            self.down()
            raise
        return self

    def cut(self) -> None:
        """Set the client's end of the link down: packets to the server go nowhere."""
        sh("ip", "-n", self.client, "link", "set", "lcl0", "down")

    def mend(self) -> None:
        sh("ip", "-n", self.db, "link", "set", "ldb0", "up")
        sh("ip", "-n", self.client, "link", "set", "lcl0", "up")

    def down(self) -> None:
        for ns in (self.db, self.client):
            if os.path.exists(f"/run/netns/{ns}"):
                sh("ip", "netns", "del", ns, check=False)

    def argv(self, *argv: str) -> list[str]:
        """argv run in the client's namespace."""
        return ["nsenter", f"--net=/run/netns/{self.client}", *argv]


class MariaDB:
    """mariadbd on a data directory of its own (in a temporary directory), listening on a
    unix socket there and, inside `netns`, on TCP `addr:port` (without netns: no TCP at all)."""

    def __init__(self, netns: str | None = None, addr: str = "127.0.0.1", port: int = 3306,
                 options: tuple[str, ...] = ()) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="na-maria-"))  # short: a socket path fits 108 bytes
        self.datadir = self.base / "data"
        self.socket = self.base / "mysqld.sock"
        self.netns = netns
        self.addr = addr
        self.port = port
        self.options = options  # more mariadbd options (a benchmark's buffer pool)
        self.proc: subprocess.Popen[bytes] | None = None
        self.installed = False
        self.tls: Path | None = None

    def make_tls(self, names: str) -> Path:
        """A CA and a server certificate for `names` (subjectAltName, e.g. "IP:10.78.0.1"); the
        server uses them from its next start. Returns the CA certificate's path."""
        d = self.base / "tls"
        d.mkdir(exist_ok=True)
        sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "ca.key"),
           "-out", str(d / "ca.pem"), "-days", "2", "-subj", "/CN=netacct-test-ca")
        sh("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "server.key"),
           "-out", str(d / "server.csr"), "-subj", "/CN=netacct-test-ledger")
        (d / "ext").write_text(f"subjectAltName={names}\n")
        sh("openssl", "x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.pem"), "-CAkey",
           str(d / "ca.key"), "-CAcreateserial", "-out", str(d / "server.pem"), "-days", "2",
           "-extfile", str(d / "ext"))
        self.tls = d
        return d / "ca.pem"

    def install(self) -> "MariaDB":
        sh("mariadb-install-db", "--no-defaults", f"--datadir={self.datadir}", "--user=root",
           "--auth-root-authentication-method=socket", "--skip-test-db")
        self.installed = True
        return self

    def start(self, timeout: float = 60) -> "MariaDB":
        if not self.installed:
            self.install()
        argv = ["mariadbd", "--no-defaults", f"--datadir={self.datadir}", f"--socket={self.socket}",
                f"--pid-file={self.base / 'mysqld.pid'}", f"--log-error={self.base / 'error.log'}",
                "--user=root", "--skip-log-bin", "--innodb-buffer-pool-size=128M", f"--tmpdir={self.base}",
                "--max-connections=400", "--skip-name-resolve"]
        argv += self.options
        if self.tls is not None:
            argv += [f"--ssl-ca={self.tls / 'ca.pem'}", f"--ssl-cert={self.tls / 'server.pem'}",
                     f"--ssl-key={self.tls / 'server.key'}"]
        if self.netns is None:
            argv.append("--skip-networking")
        else:
            argv = ["nsenter", f"--net=/run/netns/{self.netns}", *argv, f"--bind-address={self.addr}",
                    f"--port={self.port}"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mariadbd exited ({self.proc.returncode}): {self.error_log()[-2000:]}")
            if self.socket.exists() and self.sql("SELECT 1", check=False).returncode == 0:
                return self
            time.sleep(0.1)
        raise RuntimeError(f"mariadbd did not start in {timeout} s: {self.error_log()[-2000:]}")

    def error_log(self) -> str:
        try:
            return (self.base / "error.log").read_text(errors="replace")
        except OSError:
            return ""

    def sql(self, text: str, check: bool = True, database: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run SQL as the server's root over its socket; output tab-separated, no header."""
        argv = ["mariadb", "--no-defaults", f"--socket={self.socket}", "-uroot", "-N", "-B"]
        if database:
            argv.append(database)
        return sh(*argv, input=text, check=check)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send a signal to the server (by its PID) and wait for it to exit."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=120)
        self.proc = None

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def create_accounts(self, database: str, ship_password: str, report_password: str,
                        host: str = "%") -> None:
        """The ledger's database and its two accounts, as the README tells an administrator."""
        self.sql(f"""
            CREATE DATABASE IF NOT EXISTS {database} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
            CREATE USER IF NOT EXISTS 'netacct_ship'@'{host}' IDENTIFIED BY '{ship_password}';
            CREATE USER IF NOT EXISTS 'netacct_ship'@'localhost' IDENTIFIED BY '{ship_password}';
            GRANT SELECT, INSERT, UPDATE, CREATE, ALTER, INDEX, DROP ON {database}.* TO 'netacct_ship'@'{host}';
            GRANT SELECT, INSERT, UPDATE, CREATE, ALTER, INDEX, DROP ON {database}.* TO 'netacct_ship'@'localhost';
            CREATE USER IF NOT EXISTS 'netacct_report'@'{host}' IDENTIFIED BY '{report_password}';
            CREATE USER IF NOT EXISTS 'netacct_report'@'localhost' IDENTIFIED BY '{report_password}';
            GRANT SELECT ON {database}.* TO 'netacct_report'@'{host}';
            GRANT SELECT ON {database}.* TO 'netacct_report'@'localhost';
        """)
