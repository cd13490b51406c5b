"""Plumbing shared by the local keyboard-driven pages (`facereward annotate`, `facereward study`).

A standard-library HTTP server bound to loopback by default, a request handler base with JSON replies, the
DNS-rebinding Host check, JSON-only POST bodies (a cross-site form cannot send them without a CORS preflight,
which is never granted), image replies and the page's Content-Security-Policy. The routes live in each page's
own server module.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = ["IMAGE_MIME", "PAGE_CSP", "LocalHandler", "LocalServer", "bind_server", "is_loopback", "serve_until_interrupted", "server_url"]

# the pages: inline style and script plus the shared /localweb.js and /localweb.css, images and API calls from this
# server only
PAGE_CSP = ("default-src 'none'; img-src 'self'; style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'; "
            "connect-src 'self'")
SHARED = {"/localweb.js": ("localweb.js", "text/javascript; charset=utf-8"),
          "/localweb.css": ("localweb.css", "text/css; charset=utf-8")}
IMAGE_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp", ".bmp": "image/bmp"}
MAX_BODY = 64 * 1024
NO_BODY = object()  # LocalHandler.read_json_body's answer when it already replied with an error


def is_loopback(host: str) -> bool:
    """True for 'localhost' and loopback IP addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class LocalServer(ThreadingHTTPServer):
    """A threading HTTP server; `check_host` (set by `bind_server` on a loopback bind) turns the Host check on."""

    daemon_threads = True
    check_host: bool = True


class LocalHandler(BaseHTTPRequestHandler):
    """Replies (JSON, bytes, the page, an image file), the Host check and JSON request bodies; no routes."""

    server: LocalServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet: no line per request
        pass

    def send_bytes(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, status: int, data: Any) -> None:
        self.send_bytes(status, json.dumps(data).encode("utf-8"), "application/json; charset=utf-8")

    def send_page(self, html: bytes) -> None:
        self.send_bytes(HTTPStatus.OK, html, "text/html; charset=utf-8", {"Content-Security-Policy": PAGE_CSP})

    def send_image(self, real: str) -> None:
        """The bytes of an image file the caller has already checked may be served."""
        with open(real, "rb") as f:
            data = f.read()
        self.send_bytes(HTTPStatus.OK, data, IMAGE_MIME.get(Path(real).suffix.lower(), "application/octet-stream"))

    def send_shared(self, path: str) -> bool:
        """Serve what every page shares (/localweb.js, /localweb.css); True when `path` was one of them."""
        if path not in SHARED:
            return False
        from importlib import resources

        name, content_type = SHARED[path]
        self.send_bytes(HTTPStatus.OK, resources.files("facereward").joinpath(name).read_bytes(), content_type)
        return True

    def not_found(self) -> None:
        self.send_json(HTTPStatus.NOT_FOUND, {"error": "not found"})

    def host_ok(self) -> bool:
        """Refuse other Host names on a loopback bind (DNS rebinding: a web page posting answers)."""
        if not self.server.check_host:
            return True
        host = (self.headers.get("Host") or "").strip()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        name = name.strip("[]").lower()
        return name in ("localhost", "127.0.0.1", "::1") or is_loopback(name)

    def refuse_host(self) -> None:
        self.send_json(HTTPStatus.FORBIDDEN, {"error": "unexpected Host header"})

    def read_json_body(self) -> Any:
        """The request's JSON body (`{}` when empty), or NO_BODY after replying 415/400 (not JSON, too long, invalid)."""
        if (self.headers.get("Content-Type") or "").split(";")[0].strip().lower() != "application/json":
            self.send_json(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": "send application/json"})
            return NO_BODY
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self.send_json(HTTPStatus.BAD_REQUEST, {"error": "bad Content-Length"})
            return NO_BODY
        try:
            return json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            self.send_json(HTTPStatus.BAD_REQUEST, {"error": "invalid JSON body"})
            return NO_BODY

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:  # routes: in the subclass
        self.not_found()


def bind_server(server_class: type[LocalServer], handler: type[LocalHandler], host: str, port: int) -> LocalServer:
    """A bound (not yet serving) server; IPv6 hosts get an AF_INET6 socket; the Host check is on for loopback binds."""
    if ":" in host:
        server_class = type(server_class.__name__ + "6", (server_class,), {"address_family": socket.AF_INET6})
    server = server_class((host.strip("[]"), port), handler)
    server.check_host = is_loopback(host)
    return server


def server_url(server: ThreadingHTTPServer) -> str:
    """The http:// URL the server answers on (the machine's name for a wildcard bind)."""
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in str(host) else str(host)
    if shown in ("0.0.0.0", "[::]"):
        shown = socket.gethostname()
    return f"http://{shown}:{port}/"


def serve_until_interrupted(server: ThreadingHTTPServer) -> bool:
    """Serve until Ctrl-C, then close the socket; True when it was Ctrl-C that stopped it."""
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        return True
    finally:
        server.server_close()
    return False
