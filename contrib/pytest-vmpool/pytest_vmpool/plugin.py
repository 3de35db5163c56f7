"""The pytest side: options, the `vmpool` marker and the `vmpool_vm` fixture.

Each test that asks for `vmpool_vm` leases a fresh VM of its pool before it runs and releases
it after, whatever its outcome. Leases carry a ttl, so even a session killed outright leaves
none for long. Under pytest-xdist each worker leases its own VMs; nothing is shared between
processes.
"""

import sys

import pytest

from . import api
from .cli import CliBackend
from .errors import VmpoolError
from .text import duration, holder
from .vm import Leases

DEFAULT_WAIT = "120s"
DEFAULT_TTL = "1h"

_LEASES = pytest.StashKey()

# option name -> (help, default); each is an ini option and a --vmpool-NAME command-line option.
_OPTIONS = {
    "pool": ("pool the vmpool_vm fixture leases from (a vmpool marker overrides it)", None),
    "bin": ("the vmpool binary (default: vmpool on PATH)", "vmpool"),
    "state_dir": ("vmpool's --state-dir (default: vmpool's own)", None),
    "wait": (f"how long a lease waits for a ready VM (default {DEFAULT_WAIT})", DEFAULT_WAIT),
    "ttl": (f"a lease's --ttl: it ends by itself after this long (default {DEFAULT_TTL})", DEFAULT_TTL),
}


def pytest_addoption(parser):
    group = parser.getgroup("vmpool", "a fresh vmpool VM per test")
    for name, (text, _) in _OPTIONS.items():
        group.addoption(f"--vmpool-{name.replace('_', '-')}", dest=f"vmpool_{name}", default=None, help=text)
        parser.addini(f"vmpool_{name}", text, default=None)


def _option(config, name):
    value = config.getoption(f"vmpool_{name}")
    if value is None:
        value = config.getini(f"vmpool_{name}")
    return value if value not in (None, "") else _OPTIONS[name][1]


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "vmpool(pool=None, ttl=None, wait=None): the pool (and lease ttl and wait) of the test's vmpool_vm",
    )
    try:
        ttl = duration(_option(config, "ttl"), "vmpool_ttl")
        wait = duration(_option(config, "wait"), "vmpool_wait")
        backend = api.from_environment() or CliBackend(_option(config, "bin"), _option(config, "state_dir"))
    except VmpoolError as error:
        raise pytest.UsageError(str(error)) from None
    config.stash[_LEASES] = Leases(backend, ttl, wait)


def pytest_unconfigure(config):
    leases = config.stash.get(_LEASES, None)
    if leases is None:
        return
    try:
        leases.release_all()
    except VmpoolError as error:
        sys.stderr.write(f"pytest-vmpool: a VM could not be released (its lease's ttl ends it): {error}\n")


def pytest_report_header(config):
    leases = config.stash.get(_LEASES, None)
    if leases is not None:
        return f"vmpool: {leases.backend.describe()}, lease ttl {leases.ttl}, wait {leases.wait}"


def _settings(request):
    """The pool, ttl and wait of this test's lease: its closest vmpool marker first, then the
    options."""
    marker = request.node.get_closest_marker("vmpool")
    settings = {"pool": _option(request.config, "pool"), "ttl": None, "wait": None}
    if marker is not None:
        if len(marker.args) > 1:
            raise VmpoolError(f"the vmpool marker takes one positional argument, the pool: {marker.args!r}")
        unknown = set(marker.kwargs) - set(settings)
        if unknown:
            raise VmpoolError(f"the vmpool marker takes pool, ttl and wait, not {', '.join(sorted(unknown))}")
        if marker.args:
            settings["pool"] = marker.args[0]
        settings.update({key: value for key, value in marker.kwargs.items() if value is not None})
    if not isinstance(settings["pool"], str) or not settings["pool"]:
        raise VmpoolError(
            "no pool for vmpool_vm: mark the test @pytest.mark.vmpool(pool=...), or set vmpool_pool or --vmpool-pool"
        )
    return settings


@pytest.fixture(scope="session")
def vmpool_leases(request):
    """The session's leases, for fixtures of a wider scope than a test's:
    `vmpool_leases.lease(pool, holder)` returns a VM to release when done; whatever is still
    held when the session ends is released then."""
    return request.config.stash[_LEASES]


@pytest.fixture
def vmpool_vm(request):
    """A VM leased for this test alone, released after it whatever its outcome (with the
    VMs forked from it)."""
    leases = request.config.stash[_LEASES]
    settings = _settings(request)
    vm = leases.lease(
        settings["pool"], holder(f"pytest:{request.node.nodeid}"), ttl=settings["ttl"], wait=settings["wait"]
    )
    try:
        yield vm
    finally:
        vm.release()
