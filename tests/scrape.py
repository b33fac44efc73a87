"""A Prometheus-like scrape for the exporter tests, run inside a sandbox namespace: GET a URL
(HTTP or HTTPS, trusting only --ca), print {status, headers, body} or {error} as JSON."""

from __future__ import annotations

import argparse
import base64
import json
import ssl
import urllib.error
import urllib.request


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("--ca", help="the only CA to trust (HTTPS)")
    p.add_argument("--user")
    p.add_argument("--password", default="")
    p.add_argument("--cert", help="a client certificate (with --key)")
    p.add_argument("--key")
    a = p.parse_args()
    ctx = None
    if a.url.startswith("https:"):
        ctx = ssl.create_default_context(cafile=a.ca)
        if a.cert:
            ctx.load_cert_chain(a.cert, a.key)
    req = urllib.request.Request(a.url)
    if a.user is not None:
        token = base64.b64encode(f"{a.user}:{a.password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=20, context=ctx) as resp:
            out = {"status": resp.status, "headers": dict(resp.headers), "body": resp.read().decode()}
    except urllib.error.HTTPError as exc:
        out = {"status": exc.code, "headers": dict(exc.headers), "body": exc.read().decode()}
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        out = {"error": f"{type(reason).__name__}: {reason}"}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
