"""One URL to one local file, with the download's safety rules and its statuses.

- schemes: ``http`` and ``https`` only (``file`` when asked, for tests and local mirrors); a redirect
  may only lead to http/https. Anything else is ``bad_scheme``;
- a size cap: a ``Content-Length`` over it is refused before reading, a body is cut off once past it
  (``too_large``); a ``text/*`` body (a dead link's HTML page) is ``not_media`` without decoding;
- timeouts per connect and per read (``timeout``); transient failures -- 5xx, 429, timeouts, resets,
  a body shorter than its Content-Length -- are retried with exponential backoff, the others (404, a
  bad scheme, ...) never.

Plain ``urllib``: nothing is handed to a shell or another program.
"""
import http.client
import os
import random
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import NamedTuple, Optional

USER_AGENT = "singularity-ds-download/1"
BLOCK = 1 << 16


class Fetched(NamedTuple):
    status: str            # "ok" or a failure status (see statuses.py)
    error: str             # one line, "" when ok
    bytes: int             # bytes received (last attempt)
    attempts: int
    http: Optional[int]    # the last HTTP status code seen


class Failure(Exception):
    def __init__(self, status: str, error: str, transient: bool, code: Optional[int] = None):
        super().__init__(error)
        self.status, self.error, self.transient, self.code = status, error, transient, code


class SafeRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects (at most urllib's 10) to http/https only: never to file:, ftp:, data:."""

    def http_error_302(self, req, fp, code, msg, headers):
        target = headers.get("location") or headers.get("uri")
        if target:
            scheme = urllib.parse.urlsplit(urllib.parse.urljoin(req.full_url, target)).scheme.lower()
            if scheme not in ("http", "https"):
                fp.close()
                raise Failure("bad_scheme", f"redirect ({code}) to a {scheme}: URL refused", False, code)
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


_OPENER = urllib.request.build_opener(SafeRedirects)


def check_scheme(url: str, allow_file: bool) -> None:
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as e:
        raise Failure("bad_url", f"unparsable URL ({e})", False) from None
    schemes = ("http", "https", "file") if allow_file else ("http", "https")
    if not parts.scheme and not parts.netloc:  # "not a url", "www.x.com/a.mp4": no scheme://host at all
        raise Failure("bad_url", "not a URL (no scheme://host)", False)
    if parts.scheme.lower() not in schemes:
        raise Failure("bad_scheme", f"scheme {parts.scheme or '(none)'!r} refused (allowed: "
                                    f"{', '.join(schemes)})", False)
    if parts.scheme.lower() != "file" and not parts.hostname:
        raise Failure("bad_url", "no host in the URL", False)


def _attempt(url: str, dst: str, timeout: float, max_bytes: int) -> int:
    """One GET into ``dst``; -> bytes written. Raises :class:`Failure`."""
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    got = 0
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            ctype = (resp.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if length and length.isdigit() and int(length) > max_bytes:
                raise Failure("too_large", f"Content-Length {int(length)} over the cap of {max_bytes} bytes",
                              False)
            if ctype.startswith("text/"):
                raise Failure("not_media", f"served as {ctype}", False)
            with open(dst, "wb") as out:
                while True:
                    block = resp.read(BLOCK)
                    if not block:
                        break
                    got += len(block)
                    if got > max_bytes:
                        raise Failure("too_large", f"body over the cap of {max_bytes} bytes", False)
                    out.write(block)
            if length and length.isdigit() and got < int(length):  # urllib does not always raise
                raise Failure("truncated", f"body ended after {got} of {length} bytes", True)
        return got
    except Failure:
        raise
    except urllib.error.HTTPError as e:
        code = e.code
        e.close()
        if code >= 500 or code == 429:
            raise Failure("http_5xx" if code >= 500 else "http_429", f"HTTP {code}", True, code) from None
        raise Failure(f"http_{code}", f"HTTP {code}", False, code) from None
    except http.client.IncompleteRead as e:
        raise Failure("truncated", f"body ended after {got + len(e.partial)} bytes, before its "
                                   f"Content-Length", True) from None
    except (socket.timeout, TimeoutError):
        raise Failure("timeout", f"no data for {timeout:g} s", True) from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, (socket.timeout, TimeoutError)):
            raise Failure("timeout", f"no answer for {timeout:g} s", True) from None
        if isinstance(reason, socket.gaierror):
            raise Failure("dns_error", f"host not found ({reason})", False) from None
        if isinstance(reason, ssl.SSLError):
            raise Failure("ssl_error", f"TLS: {reason}", False) from None
        if isinstance(reason, FileNotFoundError):
            raise Failure("http_404", f"no such file ({reason.filename})", False) from None
        raise Failure("connection_error", f"{type(reason).__name__}: {reason}", True) from None
    except (ConnectionError, http.client.HTTPException, OSError) as e:
        raise Failure("connection_error", f"{type(e).__name__}: {e}", True) from None


def fetch(url: str, dst: str, timeout: float = 30, max_bytes: int = 200 * 2 ** 20, retries: int = 3,
          retry_wait: float = 1.0, allow_file: bool = False) -> Fetched:
    """Download ``url`` to ``dst`` (removed unless ok); transient failures retried ``retries`` times,
    waiting ``retry_wait`` x 2^attempt (+-25% jitter, so many workers do not return in step)."""
    attempt = 0
    try:
        check_scheme(url, allow_file)
        while True:
            attempt += 1
            try:
                got = _attempt(url, dst, timeout, max_bytes)
                return Fetched("ok", "", got, attempt, 200)
            except Failure as f:
                if not f.transient or attempt > retries:
                    raise
                time.sleep(retry_wait * 2 ** (attempt - 1) * random.uniform(0.75, 1.25))
    except Failure as f:
        if os.path.exists(dst):
            got = os.path.getsize(dst)
            os.remove(dst)
        else:
            got = 0
        return Fetched(f.status, f.error.splitlines()[0] if f.error else f.status, got, attempt, f.code)
