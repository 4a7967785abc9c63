"""Writing outputs without ever leaving half of one, or replacing a user's without `--force`.

Every command that writes a folder or file (init-model, import-gguf, export, quickstart) goes
through here: refuse a non-empty target unless forced, build the result in a temporary sibling
(same filesystem, so the final rename is atomic), then swap it in. A crash or a kill at any
moment leaves either the old output or the new one, plus at worst a hidden `.name.tmp-*`
sibling, never a mixture.

Permissions: what we write gets the modes a plain `open()`/`mkdir()` would give under the
user's umask (0644/0755 under umask 022). mkstemp/mkdtemp, and safetensors' own writer, make
0600/0700 files whatever the umask, which a server running as another uid cannot read; so
every output is passed through `plain_modes` before it is renamed into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError


def current_umask() -> int:
    """The process umask, read without changing it (Linux), else by setting and restoring."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_mode(directory: bool = False) -> int:
    """The mode `open()` (0o666) or `mkdir()` (0o777) gives under the current umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def plain_modes(path: Path) -> None:
    """Give `path`, and everything under it when it is a folder, the plain modes (see above)."""
    files, dirs = plain_mode(), plain_mode(directory=True)
    if not path.is_dir():
        os.chmod(path, files)
        return
    os.chmod(path, dirs)
    for root, dirnames, filenames in os.walk(path):
        for name in dirnames:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), dirs)
        for name in filenames:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), files)


def refuse_existing(out: Path, force: bool, what: str = "--out") -> None:
    """A non-empty folder, or any file, at `out` is only replaced with --force."""
    taken = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if taken and not force:
        raise UserError(f"{what} {out}: exists and is not empty; pass --force to replace it")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def replace_dir(tmp: Path, out: Path) -> None:
    """Swap a finished folder into place: whatever is at `out` goes, `tmp` becomes `out`."""
    plain_modes(tmp)  # mkdtemp makes it 0700, safetensors its files 0600
    if out.exists() or out.is_symlink():
        _remove(out)
    tmp.rename(out)


@contextmanager
def staged_dir(out: str | os.PathLike, force: bool, what: str = "--out") -> Iterator[Path]:
    """Yield an empty temporary folder beside `out`; when the block succeeds it becomes `out`."""
    out = Path(out)
    refuse_existing(out, force, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def refuse_existing_file(out: Path, force: bool, what: str = "--out") -> None:
    """As refuse_existing, for an output that is one file (a folder there is never replaced)."""
    if out.is_dir():
        raise UserError(f"{what} {out}: is a folder; give a file name")
    refuse_existing(out, force, what)


@contextmanager
def staged_file(out: str | os.PathLike, force: bool, what: str = "--out") -> Iterator[Path]:
    """Yield a temporary file path beside `out`; when the block succeeds it replaces `out`."""
    out = Path(out)
    refuse_existing_file(out, force, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        plain_modes(tmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a small file so that readers see the old content or the new, never a part."""
    raw = data.encode() if isinstance(data, str) else data
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(name, plain_mode())
        os.replace(name, path)
    finally:
        if os.path.exists(name):
            os.unlink(name)


def wait_for_file(path: Path, seconds: float, what: str) -> None:
    """Block until another process has written `path` (its last step), or fail naming `what`
    it was waiting for: how ranks wait for the one that prepares shared files."""
    import time

    deadline = time.monotonic() + seconds
    while not path.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {seconds:.0f} s for {what}")
        time.sleep(0.5)
