"""What vmpool answers, checked before use: lease records and a command's result."""

import re

from .errors import VmpoolError

_VM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ExecResult:
    """A command's exit status and its output as bytes. `text` is stdout decoded as UTF-8
    (undecodable bytes replaced), `stderr_text` the same for stderr. `truncated` says that
    the API cut the output short (never in CLI mode)."""

    __slots__ = ("status", "stdout", "stderr", "truncated")

    def __init__(self, status, stdout, stderr, truncated=False):
        self.status = status
        self.stdout = stdout
        self.stderr = stderr
        self.truncated = truncated

    @property
    def text(self):
        return self.stdout.decode("utf-8", "replace")

    @property
    def stderr_text(self):
        return self.stderr.decode("utf-8", "replace")

    def __repr__(self):
        return f"ExecResult(status={self.status}, stdout={self.stdout[:80]!r}, stderr={self.stderr[:80]!r})"


def lease_record(value, what):
    """`value` as a lease: `{id, pool, address, ports, holder, expiresAt}` with an id vmpool
    could have made and ports mapping guest ports to host ports."""
    if not isinstance(value, dict):
        raise VmpoolError(f"{what} answered {type(value).__name__}, not a lease object")
    vm = value.get("id")
    if not isinstance(vm, str) or not _VM_ID.match(vm):
        raise VmpoolError(f"{what} answered a lease with no valid VM id: {vm!r}")
    ports = value.get("ports") or {}
    if not isinstance(ports, dict) or not all(
        isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536 for port in ports.values()
    ):
        raise VmpoolError(f"{what} answered ports that are not a map of port numbers: {ports!r}")
    for key in ("pool", "address", "holder", "expiresAt"):
        if value.get(key) is not None and not isinstance(value[key], str):
            raise VmpoolError(f"{what} answered a lease whose {key} is not text: {value[key]!r}")
    return {
        "id": vm,
        "pool": value.get("pool"),
        "address": value.get("address"),
        "ports": {str(guest): host for guest, host in ports.items()},
        "holder": value.get("holder"),
        "expiresAt": value.get("expiresAt"),
    }


def lease_records(value, what, count):
    """`value` as an array of `count` leases (what `fork` answers)."""
    if not isinstance(value, list):
        raise VmpoolError(f"{what} answered {type(value).__name__}, not an array of leases")
    records = [lease_record(item, what) for item in value]
    if len(records) != count:
        raise VmpoolError(f"{what} answered {len(records)} leases for {count} asked")
    return records
