"""vmpool through its command line: `lease -o json`, `fork -o json`, `exec`, `cp`, `release`."""

import json
import os
import shutil
import signal
import subprocess

from .errors import VmpoolError
from .result import ExecResult, lease_record, lease_records
from .text import seconds

# vmpool exec's own failure (no such VM, VM not running, agent gone), as docker exec's.
EXEC_FAILED = 125
# How long vmpool is given to end after SIGTERM (it kills the command in the guest first).
STOP_GRACE = 15
# Beyond a command's own --timeout, how long vmpool may take to start and report it.
EXEC_SLACK = 120


class CliBackend:
    """Runs `binary` (a path, or a name looked up on PATH) with `--state-dir` when given."""

    def __init__(self, binary, state_dir=None):
        self.binary = binary
        self.state_dir = state_dir
        self._resolved = None

    def describe(self):
        return f"{self.binary} (state dir {self.state_dir})" if self.state_dir else self.binary

    def _command(self, subcommand, *args):
        if self._resolved is None:
            found = shutil.which(self.binary)
            if found is None:
                raise VmpoolError(
                    f"the vmpool binary {self.binary!r} was not found (set vmpool_bin or --vmpool-bin, or put vmpool on PATH)"
                )
            self._resolved = found
        options = ["--state-dir", self.state_dir] if self.state_dir else []
        return [self._resolved, *subcommand, *options, *args]

    def _run(self, command, stdin=None, timeout=None, interrupted=None):
        """Runs `command` in a session of its own, so that it ends only when told. On any
        exception while it runs (KeyboardInterrupt, a timeout) it gets SIGTERM (vmpool then
        ends what it started in the guest), and `interrupted` is called with what it printed,
        before the exception goes on."""
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            out, err = process.communicate(stdin, timeout=timeout)
        except BaseException as error:
            process.send_signal(signal.SIGTERM)
            try:
                out, _ = process.communicate(timeout=STOP_GRACE)
            except BaseException:
                process.kill()
                out, _ = process.communicate()
            if interrupted is not None:
                interrupted(out)
            if isinstance(error, subprocess.TimeoutExpired):
                raise VmpoolError(f"{' '.join(command[1:3])} did not end within {timeout:.0f}s; stopped") from None
            raise
        return process.returncode, out, err

    def _check(self, what, code, err):
        if code != 0:
            message = err.decode("utf-8", "replace").strip() or f"exit status {code}"
            raise VmpoolError(f"{what} failed: {message}")

    def lease(self, pool, holder, ttl, wait):
        command = self._command(
            ["lease"], pool, "--ttl", ttl, "--wait", wait, "--holder", holder, "-o", "json"
        )
        code, out, err = self._run(
            command, timeout=seconds(wait) + EXEC_SLACK, interrupted=lambda out: self._give_up([out])
        )
        self._check(f"vmpool lease {pool}", code, err)
        return lease_record(_json(out, "vmpool lease"), "vmpool lease")

    def fork(self, vm, count, ttl, holder):
        command = self._command(
            ["fork"], vm, "--count", str(count), "--ttl", ttl, "--holder", holder, "-o", "json"
        )
        code, out, err = self._run(command, interrupted=lambda out: self._give_up([out], many=True))
        if code != 0:
            # Some copies may have started (fork prints those and exits 1): they are given back.
            self._give_up([out], many=True)
            self._check(f"vmpool fork {vm}", code, err)
        try:
            return lease_records(_json(out, "vmpool fork"), "vmpool fork", count)
        except VmpoolError:
            self._give_up([out], many=True)
            raise

    def release(self, vm):
        code, _, err = self._run(self._command(["release"], vm))
        self._check(f"vmpool release {vm}", code, err)

    def _give_up(self, outputs, many=False):
        """Releases whatever an interrupted lease or a failed fork printed before it ended."""
        for out in outputs:
            try:
                records = json.loads(out)
                for record in records if many else [records]:
                    self._run(self._command(["release"], str(record["id"])))
            except (ValueError, TypeError, KeyError, OSError):
                pass

    def exec(self, vm, argv, stdin, env, workdir, timeout):
        args = [vm]
        if stdin is not None:
            args.append("-i")
        for key, value in env.items():
            args += ["-e", f"{key}={value}"]
        if workdir is not None:
            args += ["-w", workdir]
        if timeout is not None:
            args += ["--timeout", timeout]
        command = self._command(["exec"], *args, "--", *argv)
        limit = seconds(timeout) + EXEC_SLACK if timeout is not None else None
        code, out, err = self._run(command, stdin=stdin, timeout=limit)
        if code == EXEC_FAILED:
            message = err.decode("utf-8", "replace").strip() or "no message"
            raise VmpoolError(f"vmpool exec {vm} failed (exit 125): {message}")
        return ExecResult(code, out, err)

    def copy_in(self, vm, source, destination):
        source = os.path.abspath(source)
        code, _, err = self._run(self._command(["cp"], source, f"{vm}:{destination}"))
        self._check(f"vmpool cp {source} {vm}:{destination}", code, err)

    def copy_out(self, vm, source, destination):
        destination = os.path.abspath(destination)
        code, _, err = self._run(self._command(["cp"], f"{vm}:{source}", destination))
        self._check(f"vmpool cp {vm}:{source} {destination}", code, err)


def _json(out, what):
    try:
        return json.loads(out)
    except ValueError:
        raise VmpoolError(f"{what} printed no JSON: {out[:200]!r}") from None
