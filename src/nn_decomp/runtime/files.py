"""Files that are never seen half-written: the one place results, statuses, caches and checkpoint
directories are published.

- `replacing(path)`: write to a temporary sibling, fsync it, rename it over `path` (POSIX rename is
  atomic): a reader sees the old file or the new one, and a crash leaves the old one. `write_atomic`
  is its text / bytes form.
- `replacing_dir(out)`: the same for a directory (a checkpoint, an export): written into `out`.tmp,
  synced and swapped in by two renames (`publish_dir`, optionally keeping the replaced one as
  `out`.prev); `recover_dir` undoes a crash between them.
- `refuse_existing`: a command that would replace a result refuses unless told `overwrite=true`;
  `unwritable`: why a run dir could not be written, asked before anything is.
"""
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nn_decomp.config import UsageError


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path` (same suffix, for writers that look at it) to write
    the new file to; on leaving the block without an error it is synced and renamed onto `path`,
    on an error removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        sync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    with replacing(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


@contextmanager
def replacing_dir(out: str | Path, keep_previous: bool = False) -> Iterator[Path]:
    """Yields an empty `out`.tmp to write the new version of the directory `out` into; on leaving the
    block without an error it is swapped in (`publish_dir`; `keep_previous`: the version it replaces
    becomes `out`.prev). After an error the partial .tmp is removed (a full disk gets its space back)."""
    out = Path(out)
    tmp = fresh_tmp(out)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, out, keep_previous)


def refuse_existing(paths: list[Path], overwrite: bool) -> None:
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        raise UsageError(f"{existing[0]} exists; pass overwrite=true to replace it, or out=DIR to write elsewhere")


def unwritable(out: str | Path) -> str | None:
    """Why the directory `out` cannot be created or written into (its nearest existing ancestor
    decides), or None if it can."""
    out = Path(out).absolute()
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing}: not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing}: permission denied or read-only"
    return None


def sync(path: Path) -> None:
    """fsync a file or a directory (its entries), so that a rename after it cannot outlive its data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def siblings(out: Path) -> tuple[Path, Path]:
    """(`out`.tmp, `out`.old): where the next version is written, where the previous one waits."""
    return out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")


def previous(out: Path) -> Path:
    """`out`.prev: the version before `out`, kept by publish_dir(keep_previous=True)."""
    return out.with_name(out.name + ".prev")


def fresh_tmp(out: Path) -> Path:
    """An empty `out`.tmp to write the next version of `out` into (after recovering a crashed swap,
    so that `out` exists whenever a .tmp is only partly written)."""
    recover_dir(out)
    tmp, _ = siblings(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish_dir(tmp: Path, out: Path, keep_previous: bool = False) -> None:
    """Swap the fully written `tmp` in as `out`: sync tmp's files, `out` → `out`.old, tmp → `out`,
    `out`.old → `out`.prev or removed. Between the two renames only .old and a complete .tmp exist
    (recover_dir; a crash just after them costs the .prev, never `out`).
    Files get the mode the umask allows (safetensors writes 0600: others on a cluster could not read)."""
    mask = os.umask(0)
    os.umask(mask)
    for f in tmp.iterdir():
        f.chmod(0o666 & ~mask)
        sync(f)
    sync(tmp)
    _, old = siblings(out)
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    sync(out.parent)
    if keep_previous and old.exists():
        shutil.rmtree(previous(out), ignore_errors=True)
        old.rename(previous(out))
        sync(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(out: Path) -> None:
    """Undo a crash inside publish_dir: with `out` missing but `out`.old present, the crash fell
    between the renames, and `out`.tmp (synced before `out` moved) is the newer complete version."""
    out = Path(out)
    tmp, old = siblings(out)
    if not out.exists() and old.exists():
        (tmp if tmp.exists() else old).rename(out)
        sync(out.parent)
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
