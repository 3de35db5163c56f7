"""The errors the plugin raises."""


class VmpoolError(Exception):
    """vmpool itself failed: a lease, release, fork or copy did not happen, or a command could
    not be run in the guest (`vmpool exec` exited 125, or the API answered an error)."""


class CommandFailed(Exception):
    """A command run with `check=True` exited with a status other than 0. `result` holds its
    status and output."""

    def __init__(self, argv, result):
        self.argv = list(argv)
        self.result = result
        tail = result.stderr[-2000:].decode("utf-8", "replace").strip()
        message = f"{self.argv!r} exited with status {result.status}"
        super().__init__(f"{message}: {tail}" if tail else message)
