"""vmpool through its HTTP API (`VMPOOL_API`), with the standard library alone.

Leases: `POST /v1/pools/{pool}/leases`, `DELETE /v1/leases/{vm}`; forks: `POST
/v1/vms/{vm}/forks`; commands: `POST /v1/vms/{vm}/exec`; files: `PUT` and `GET
/v1/vms/{vm}/files?path=...` with a tar stream of one entry. Redirects are not followed, so
the bearer token goes to the address given and nowhere else.
"""

import base64
import json
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request

from . import tarstream
from .errors import VmpoolError
from .result import ExecResult, lease_record, lease_records
from .text import seconds

# Beyond a lease's wait or a command's timeout, how long the service may take to answer.
SLACK = 120
# Without a wait or timeout to go by (release, files, a command with no timeout).
DEFAULT_TIMEOUT = 600
# Tar streams up to this size stay in memory; larger ones go to a temporary file.
SPOOL = 8 << 20


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class ApiBackend:
    """Talks to the service at `base` (`http://host:port`), with `token` as bearer token."""

    def __init__(self, base, token=None):
        parsed = urllib.parse.urlsplit(base)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise VmpoolError(f"VMPOOL_API must be an http:// or https:// base URL, got {base!r}")
        self.base = base.rstrip("/")
        self.token = token
        self._opener = urllib.request.build_opener(_NoRedirect)

    def describe(self):
        return f"the vmpool API at {self.base}"

    def _request(self, method, path, query=None, body=None, content_type=None, timeout=DEFAULT_TIMEOUT, stream=False):
        """The answer's status and body (or, with `stream`, the open response). An error
        status or an unreachable service raises VmpoolError with the service's own words."""
        url = self.base + path + ("?" + urllib.parse.urlencode(query) if query else "")
        request = urllib.request.Request(url, data=body, method=method)
        if content_type:
            request.add_header("Content-Type", content_type)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            response = self._opener.open(request, timeout=timeout)
        except urllib.error.HTTPError as error:
            with error:
                raise VmpoolError(f"{method} {path}: HTTP {error.code}: {_error_text(error)}") from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise VmpoolError(f"{method} {path}: cannot reach the vmpool API at {self.base}: {reason}") from None
        if stream:
            return response
        with response:
            return response.status, response.read()

    def _json(self, method, path, payload, timeout=DEFAULT_TIMEOUT):
        body = json.dumps(payload).encode()
        _, answer = self._request(method, path, body=body, content_type="application/json", timeout=timeout)
        try:
            return json.loads(answer)
        except ValueError:
            raise VmpoolError(f"{method} {path} answered no JSON: {answer[:200]!r}") from None

    def lease(self, pool, holder, ttl, wait):
        path = f"/v1/pools/{_segment(pool)}/leases"
        answer = self._json("POST", path, {"holder": holder, "ttl": ttl, "wait": wait}, seconds(wait) + SLACK)
        return lease_record(answer, f"POST {path}")

    def fork(self, vm, count, ttl, holder):
        path = f"/v1/vms/{_segment(vm)}/forks"
        answer = self._json("POST", path, {"count": count, "ttl": ttl, "holder": holder})
        try:
            return lease_records(answer, f"POST {path}", count)
        except VmpoolError:
            for record in answer if isinstance(answer, list) else []:
                if isinstance(record, dict) and isinstance(record.get("id"), str):
                    try:
                        self.release(record["id"])
                    except VmpoolError:
                        pass
            raise

    def release(self, vm):
        self._request("DELETE", f"/v1/leases/{_segment(vm)}")

    def exec(self, vm, argv, stdin, env, workdir, timeout):
        path = f"/v1/vms/{_segment(vm)}/exec"
        payload = {"argv": list(argv)}
        if env:
            payload["env"] = dict(env)
        if workdir is not None:
            payload["workdir"] = workdir
        if stdin is not None:
            payload["stdin"] = base64.b64encode(stdin).decode()
        if timeout is not None:
            payload["timeout"] = timeout
        limit = seconds(timeout) + SLACK if timeout is not None else None
        answer = self._json("POST", path, payload, timeout=limit)
        if not isinstance(answer, dict):
            raise VmpoolError(f"POST {path} answered {type(answer).__name__}, not an exec result")
        status = answer.get("exitStatus")
        if not isinstance(status, int) or isinstance(status, bool) or not 0 <= status <= 255:
            raise VmpoolError(f"POST {path} answered no exit status: {status!r}")
        return ExecResult(
            status,
            _base64(answer.get("stdout"), f"POST {path} stdout"),
            _base64(answer.get("stderr"), f"POST {path} stderr"),
            answer.get("truncated") is True,
        )

    def copy_in(self, vm, source, destination):
        path = f"/v1/vms/{_segment(vm)}/files"
        with tempfile.SpooledTemporaryFile(SPOOL) as spool:
            tarstream.pack(source, spool)
            body = spool.read()
        self._request("PUT", path, query={"path": destination}, body=body, content_type="application/x-tar")

    def copy_out(self, vm, source, destination):
        path = f"/v1/vms/{_segment(vm)}/files"
        response = self._request("GET", path, query={"path": source}, stream=True)
        with response, tempfile.SpooledTemporaryFile(SPOOL) as spool:
            copied = 0
            while chunk := response.read(1 << 20):
                copied += len(chunk)
                if copied > tarstream.MAX_BYTES + (1 << 30):
                    raise VmpoolError(f"GET {path} answered more than {tarstream.MAX_BYTES} bytes")
                spool.write(chunk)
            spool.seek(0)
            return tarstream.unpack(spool, destination)


def _segment(text):
    return urllib.parse.quote(text, safe="")


def _error_text(error):
    """The service's `{"error": "..."}`, or the status's reason."""
    try:
        answer = json.loads(error.read(64 << 10))
        if isinstance(answer, dict) and isinstance(answer.get("error"), str):
            return answer["error"]
    except (ValueError, OSError):
        pass
    return error.reason


def _base64(value, what):
    if value is None:
        return b""
    try:
        return base64.b64decode(value, validate=True)
    except (ValueError, TypeError):
        raise VmpoolError(f"{what} is not base64") from None


def from_environment():
    """An ApiBackend when VMPOOL_API is set, else None."""
    base = os.environ.get("VMPOOL_API")
    if not base:
        return None
    return ApiBackend(base, os.environ.get("VMPOOL_TOKEN") or None)
