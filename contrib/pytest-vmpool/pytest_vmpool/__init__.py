"""A pytest plugin that gives each test a fresh VM leased from a vmpool pool."""

from .errors import CommandFailed, VmpoolError
from .result import ExecResult
from .vm import VM

__all__ = ["VM", "ExecResult", "VmpoolError", "CommandFailed"]
