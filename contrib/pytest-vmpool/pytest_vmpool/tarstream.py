"""Tar streams of one entry for the API's files endpoint: made from a host path, and read back
trusting nothing in them.

A stream read from a guest may name anything: extraction refuses absolute names, `..`, a name
outside the one entry, a name through a symlink, a symlink or hard link pointing outside the
entry, devices and fifos, and stops past its bounds. It extracts into a hidden temporary name
beside the destination and renames it into place once complete, so a failure leaves the
destination as it was.
"""

import os
import shutil
import stat
import tarfile
import tempfile

from .errors import VmpoolError

MAX_ENTRIES = 1_000_000
MAX_BYTES = 64 << 30
MAX_NAME = 4096
MAX_DEPTH = 256


def pack(source, spool):
    """Writes a tar stream of `source` (a file, directory or symlink, symlinks kept as they
    are) into the binary file `spool`, its one entry named after `source`'s last component."""
    if not os.path.lexists(source):
        raise VmpoolError(f"no such file or directory on the host: {source}")
    name = os.path.basename(os.path.normpath(source))
    if name in ("", ".", ".."):
        raise VmpoolError(f"cannot copy {source!r}: name the file or directory itself")
    with tarfile.open(fileobj=spool, mode="w", format=tarfile.PAX_FORMAT) as archive:
        archive.add(source, arcname=name, recursive=True)
    spool.seek(0)
    return name


def _relative(name):
    """The member name's components, or an error for an absolute name or one with `..`."""
    if name.startswith("/"):
        raise VmpoolError(f"the guest's archive names an absolute path: {name!r}")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME:
        raise VmpoolError(f"the guest's archive has a name longer than {MAX_NAME} bytes")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if not parts:
        raise VmpoolError(f"the guest's archive has an empty name: {name!r}")
    if ".." in parts:
        raise VmpoolError(f"the guest's archive names a path with '..': {name!r}")
    if len(parts) > MAX_DEPTH:
        raise VmpoolError(f"the guest's archive is more than {MAX_DEPTH} directories deep")
    return parts


def unpack(stream, destination):
    """Extracts the one-entry tar stream `stream` (a binary file) to `destination`: into it
    when it is an existing directory, else as it. Returns the path written."""
    destination = os.path.abspath(destination)
    try:
        archive = tarfile.open(fileobj=stream, mode="r:")
    except tarfile.TarError as error:
        raise VmpoolError(f"the guest's archive is damaged: {error}") from None
    with archive:
        return _unpack(archive, destination)


def _unpack(archive, destination):
    top = None  # the entry's name in the stream
    target = None  # where it goes on the host
    staging = None  # the hidden directory beside target the copy is made in
    made = None  # the copy in staging, named as target is (its links then resolve alike)
    files = {}  # path within the entry -> extracted host path, for hard links
    links = []
    total = 0
    try:
        for count, member in enumerate(_members(archive), start=1):
            if count > MAX_ENTRIES:
                raise VmpoolError(f"the guest's archive has more than {MAX_ENTRIES} entries")
            parts = _relative(member.name)
            if top is None:
                top = parts[0]
                target = os.path.join(destination, top) if os.path.isdir(destination) else destination
                parent = os.path.dirname(target)
                if not os.path.isdir(parent):
                    raise VmpoolError(f"no such directory on the host: {parent}")
                if os.path.isdir(target) and not os.path.islink(target):
                    raise VmpoolError(f"{target} is an existing directory; a copy is never merged into one")
                staging = tempfile.mkdtemp(prefix=".vmpool-cp-", dir=parent)
                made = os.path.join(staging, os.path.basename(target))
            elif parts[0] != top:
                raise VmpoolError(f"the guest's archive holds {member.name!r}, outside its entry {top!r}")
            key = "/".join(parts)
            path = os.path.join(made, *parts[1:])
            _check_parents(made, parts)
            if member.isdir():
                os.makedirs(path, mode=0o700, exist_ok=True)
            elif member.isreg():
                total += member.size
                if total > MAX_BYTES:
                    raise VmpoolError(f"the guest's archive holds more than {MAX_BYTES} bytes")
                _make_parent(path)
                with open(path, "xb") as out:
                    shutil.copyfileobj(archive.extractfile(member), out, 1 << 20)
                os.chmod(path, member.mode & 0o777)
                files[key] = path
            elif member.issym():
                _check_link(parts, member.linkname, member.name)
                _make_parent(path)
                os.symlink(member.linkname, path)
                links.append((path, member.name, member.linkname))
            elif member.islnk():
                linked = "/".join(_relative(member.linkname))
                if linked not in files:
                    raise VmpoolError(
                        f"the guest's archive links {member.name!r} to {member.linkname!r}, no earlier file of the copy"
                    )
                _make_parent(path)
                os.link(files[linked], path)
                files[key] = path
            else:
                raise VmpoolError(f"the guest's archive holds {member.name!r}, a device or fifo; refused")
            if not member.issym():
                os.utime(path, (member.mtime, member.mtime))
        if top is None:
            raise VmpoolError("the guest's archive is empty")
        # Each link pointed inside the entry by its own text; resolved through the others too.
        root = os.path.realpath(made)
        for path, name, linkname in links:
            resolved = os.path.realpath(path)
            if resolved != root and not resolved.startswith(root + os.sep):
                raise VmpoolError(f"the guest's archive has a symlink {name!r} to {linkname!r}, outside the copy")
        _finish_directories(archive, made)
        if os.path.isdir(made) and not os.path.islink(made) and os.path.lexists(target):
            raise VmpoolError(f"{target} exists; a directory is never put in place of it")
        os.replace(made, target)
        return target
    except OSError as error:
        raise VmpoolError(f"cannot write {target or destination} on the host: {error.strerror or error}") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _members(archive):
    try:
        yield from archive
    except tarfile.TarError as error:
        raise VmpoolError(f"the guest's archive is damaged: {error}") from None


def _check_parents(made, parts):
    """Refuses a name that goes through a symlink or a file extracted earlier, or names a
    file twice."""
    path = made
    for part in parts[1:-1]:
        path = os.path.join(path, part)
        if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
            raise VmpoolError(f"the guest's archive names {'/'.join(parts)!r} through a symlink or file")
    whole = os.path.join(made, *parts[1:])
    if os.path.lexists(whole) and (os.path.islink(whole) or not os.path.isdir(whole)):
        raise VmpoolError(f"the guest's archive names {'/'.join(parts)!r} twice")


def _make_parent(path):
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)


def _check_link(parts, linkname, name):
    """A symlink's text must stay inside the entry: relative, and never climbing above the
    entry's top directory on the way."""
    if len(parts) == 1:
        raise VmpoolError(f"{name!r} is a symlink (to {linkname!r}) in the guest; copy what it points to")
    if not linkname or linkname.startswith("/"):
        raise VmpoolError(f"the guest's archive has a symlink {name!r} to {linkname!r}, outside the copy")
    depth = len(parts) - 1  # the link's directory: 0 is the entry's parent, 1 the entry
    for part in linkname.split("/"):
        if part in ("", "."):
            continue
        depth = depth - 1 if part == ".." else depth + 1
        if depth < 1:
            raise VmpoolError(f"the guest's archive has a symlink {name!r} to {linkname!r}, outside the copy")


def _finish_directories(archive, made):
    """Directory modes (the 0777 bits, kept enterable by their owner) and times, deepest first,
    once their contents are in."""
    directories = [member for member in archive.getmembers() if member.isdir()]
    for member in sorted(directories, key=lambda m: m.name.count("/"), reverse=True):
        path = os.path.join(made, *_relative(member.name)[1:])
        os.chmod(path, stat.S_IMODE(member.mode) & 0o777 | 0o700)
        os.utime(path, (member.mtime, member.mtime))
