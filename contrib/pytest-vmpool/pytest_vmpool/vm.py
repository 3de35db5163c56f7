"""A leased VM and what a test does with it; the leases a test session holds."""

import os
import threading

from .errors import CommandFailed, VmpoolError
from .text import duration
from .text import holder as clean_holder


class Leases:
    """The VMs this process leased and has not released, so that whatever ends the session
    (a KeyboardInterrupt included) releases what a test's teardown did not."""

    def __init__(self, backend, ttl, wait):
        self.backend = backend
        self.ttl = ttl
        self.wait = wait
        self._live = {}
        self._lock = threading.Lock()

    def lease(self, pool, holder="pytest", ttl=None, wait=None):
        """A VM of `pool` leased for `holder` (control characters dropped, cut to 200
        characters), waiting up to `wait` for one to be ready; `ttl` and `wait` default to the
        session's."""
        if not isinstance(pool, str) or not pool:
            raise VmpoolError(f"lease needs a pool name, got {pool!r}")
        holder = clean_holder(holder)
        ttl = duration(ttl, "ttl") if ttl is not None else self.ttl
        wait = duration(wait, "wait") if wait is not None else self.wait
        record = self.backend.lease(pool, holder, ttl, wait)
        return self._track(record, holder)

    def _track(self, record, holder):
        vm = VM(self, record, holder)
        with self._lock:
            self._live[vm.id] = vm
        return vm

    def _forget(self, vm):
        with self._lock:
            return self._live.pop(vm.id, None) is not None

    def release_all(self):
        """Releases every VM still held; the first failure is raised after trying them all."""
        with self._lock:
            live = list(self._live.values())
        failure = None
        for vm in reversed(live):
            try:
                vm.release()
            except VmpoolError as error:
                failure = failure or error
        if failure is not None:
            raise failure


class VM:
    """One leased VM: `id`, `pool`, `address` and `ports` (guest port text to host port) as
    the lease gave them, `holder` and `expires_at` (RFC 3339 text, or None)."""

    def __init__(self, leases, record, holder):
        self._leases = leases
        self._forks = []
        self._holder = holder  # as sent: forks are leased to it too
        self.id = record["id"]
        self.pool = record["pool"]
        self.address = record["address"]
        self.ports = record["ports"]
        self.holder = record["holder"] or holder
        self.expires_at = record["expiresAt"]

    def __repr__(self):
        return f"<VM {self.id} of pool {self.pool}>"

    def exec(self, *argv, input=None, env=None, workdir=None, timeout=None, check=False):
        """Runs `argv` in the VM (no shell unless argv is one) and returns an ExecResult.
        `input` (bytes or text) is its stdin, else /dev/null; `env` adds environment
        variables; `workdir` is its directory (default /); `timeout` (seconds or a duration
        such as 30s) kills it with status 137. With `check`, a status other than 0 raises
        CommandFailed. A failure of vmpool itself raises VmpoolError."""
        if not argv:
            raise VmpoolError("exec needs a command: vm.exec('uname', '-a')")
        argv = [os.fspath(arg) for arg in argv]
        if not all(isinstance(arg, str) for arg in argv):
            raise VmpoolError(f"exec takes text arguments, got {argv!r}")
        if isinstance(input, str):
            input = input.encode()
        environment = {}
        for key, value in (env or {}).items():
            if not isinstance(key, str) or not key or "=" in key or "\0" in key:
                raise VmpoolError(f"exec env: {key!r} is not an environment variable name")
            environment[key] = str(value)
        if workdir is not None:
            workdir = os.fspath(workdir)
        timeout = duration(timeout, "exec timeout") if timeout is not None else None
        result = self._leases.backend.exec(self.id, argv, input, environment, workdir, timeout)
        if check and result.status != 0:
            raise CommandFailed(argv, result)
        return result

    def cp_in(self, src, dst):
        """Copies the host file, directory or symlink `src` to `dst` in the VM (into `dst`
        when it is an existing directory there)."""
        self._leases.backend.copy_in(self.id, os.fspath(src), _guest_path(dst))

    def cp_out(self, src, dst):
        """Copies the file, directory or symlink `src` of the VM to the host path `dst` (into
        `dst` when it is an existing directory)."""
        self._leases.backend.copy_out(self.id, _guest_path(src), os.fspath(dst))

    def fork(self, count=1, ttl=None):
        """`count` new VMs made from this one's current state (memory and disks), each leased
        to this test and released with it. `ttl` defaults to the session's."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise VmpoolError(f"fork count must be a whole number of 1 or more, got {count!r}")
        ttl = duration(ttl, "fork ttl") if ttl is not None else self._leases.ttl
        records = self._leases.backend.fork(self.id, count, ttl, self._holder)
        forks = [self._leases._track(record, self._holder) for record in records]
        self._forks.extend(forks)
        return forks

    def release(self):
        """Ends the lease of this VM and of its forks (the VMs are stopped). Releasing again
        does nothing."""
        failure = None
        for fork in reversed(self._forks):
            try:
                fork.release()
            except VmpoolError as error:
                failure = failure or error
        if self._leases._forget(self):
            try:
                self._leases.backend.release(self.id)
            except BaseException:
                # Still held: the session's end tries again, and the lease's ttl ends it anyway.
                with self._leases._lock:
                    self._leases._live[self.id] = self
                raise
        if failure is not None:
            raise failure


def _guest_path(path):
    path = os.fspath(path)
    if not isinstance(path, str) or not path:
        raise VmpoolError(f"a guest path must be non-empty text, got {path!r}")
    return path
