"""Atomic file writes (a reader sees the old file or the complete new one, never a partial one), and a keyed
JSON cache built on them (the calibrations of `estimate --time` and of the dry run's runtime term)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from fullres.errors import UserError


def special_file(path: Path) -> str | None:
    """What `path` is when it exists and is neither a regular file nor a folder ("a device", "a FIFO",
    "a socket"), following a symlink; else None. A write must never replace such a file with a regular one."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file"


def refuse_special(path: Path, option: str) -> None:
    """UserError naming `option` when the output `path` is a device, FIFO or socket (see :func:`special_file`)."""
    if (kind := special_file(Path(path))) is not None:
        raise UserError(f"{option} {path} is {kind}, not a regular file: fullres writes regular files only")


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[BinaryIO]:
    """Yield a binary file in `path`'s folder; on success flush, fsync and rename it over `path`.

    The file gets the usual permissions (0666 less the umask), not mkstemp's private 0600. A `path` that is
    a device, FIFO or socket is refused (UserError) before anything is written.
    """
    refuse_special(path, "output")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            yield file
            file.flush()
            os.fchmod(file.fileno(), 0o666 & ~current_umask())
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException as error:
        Path(temp_name).unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename is None:  # a failed write names no file: name `path`
            raise OSError(error.errno, error.strerror or f"write failed ({error}; is the disk full?)", str(path)) from error
        raise


def unfinished_writes(path: Path) -> list[Path]:
    """The temporary files of :func:`atomic_write` calls for `path` that never reached their rename (a
    killed process leaves them behind; nothing ever reads them)."""
    return sorted(temp for temp in path.parent.glob(f".{path.name}.*.tmp") if temp.is_file())


def write_bytes_atomically(path: Path, data: bytes) -> None:
    with atomic_write(path) as file:
        file.write(data)


def write_json(path: Path, data: dict) -> None:
    """`data` as indented JSON with a final newline, written atomically."""
    write_bytes_atomically(path, (json.dumps(data, indent=2) + "\n").encode())


@contextlib.contextmanager
def staged_folder(out: Path, move_into_place: Callable[[Path, Path], None]) -> Iterator[Path]:
    """A temporary folder beside `out` with the usual permissions (0777 less the umask) to fill in the
    block; when the block succeeds `move_into_place(temp, out)` puts it in place, and on any failure it is
    removed, so `out` is never seen half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        temp.chmod(0o777 & ~current_umask())  # mkdtemp makes it private
        yield temp
        move_into_place(temp, out)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


# A keyed JSON cache: one file of records, each stored under the SHA-256 of its key (a JSON-able dict) and
# keeping the key beside it, so a digest collision or a hand-edited file can never return a wrong record.

def user_cache_dir() -> Path:
    """fullres's per-user cache folder: $XDG_CACHE_HOME/fullres, else ~/.cache/fullres (runtime terms,
    time calibrations, the compiled CPU pool)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fullres"


def _cache_digest(key: dict) -> tuple[str, dict]:
    text = json.dumps(key, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest(), json.loads(text)  # as read back: lists, not tuples


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError, RecursionError):
        return {}


def cache_lookup(path: Path, key: dict) -> dict | None:
    """The record stored under `key` in the cache file `path`; None when absent or unreadable."""
    digest, key = _cache_digest(key)
    record = _read_cache(path).get(digest)
    return record if isinstance(record, dict) and record.get("key") == key else None


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """SHA-256 of fullres's own Python source (every module, by path): what a cached result computed by the
    code as it stands is keyed by, so that an upgrade or an edit never reads one the old code computed."""
    package = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def cache_store(path: Path, key: dict, record: dict) -> dict:
    """Store `record` (with its "key") under `key` in the cache file `path`, atomically, keeping the entries
    other processes may have added meanwhile. A folder that cannot be written leaves the record uncached.
    Returns the record as stored."""
    digest, key = _cache_digest(key)
    record = {**record, "key": key}
    entries = _read_cache(path)
    entries[digest] = record
    try:
        write_bytes_atomically(path, json.dumps(entries, indent=1, sort_keys=True).encode())
    except OSError:
        pass  # a read-only home: the value stands, only uncached
    return record
