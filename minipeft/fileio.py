"""Writing files users care about, so that a crash never leaves half a file (spec/io.md IO-1).

The recipe, as POSIX allows it: write everything to a temporary file in the same folder, flush
and fsync it, rename it over the target with os.replace (atomic within one file system), then
fsync the folder so that the rename itself survives a power cut.

What is guaranteed (IO-1):
- atomic_write: whoever opens `path` sees either the complete previous file or the complete new
  one, never a mix, also when the writer is killed (SIGKILL, power cut) at any instant. If the
  body raises, the temporary file is removed and the previous file is untouched.
- atomic_save_dir: each file under `path` is at every instant a complete old or a complete new
  version of itself. The folder as a whole is not atomic: after a crash half way some files may
  be new and others old (see atomic_save_dir for the order).
- A killed writer may leave a temporary file `.<name>.<random>.tmp`, or a folder of that name
  (atomic_path) or `.<name>.<random>.tmpdir` (atomic_save_dir), next to the target. Such names
  start with a dot and end in .tmp or .tmpdir, so they are never taken for the file itself; they
  are safe to delete.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil

from .errors import CheckpointError, ConfigError


def _fsync_dir(folder: str) -> None:
    """Make a rename inside `folder` durable. Some platforms (Windows) cannot open folders."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders; the rename is still atomic
    finally:
        os.close(fd)


def _temp_name(path: str, suffix: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{secrets.token_hex(6)}{suffix}")


def _reserve(path: str, suffix: str, create) -> str:
    """A fresh temporary name next to `path`, made with create(name) (which fails if it exists)."""
    while True:
        tmp = _temp_name(path, suffix)
        try:
            create(tmp)
            return tmp
        except FileExistsError:
            continue


def _new_file(name: str) -> None:
    os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # umask applies


def _commit(written: str, path: str) -> None:
    """fsync the finished temporary file, rename it over `path`, fsync the folder (IO-1)."""
    with open(written, "rb") as f:
        os.fsync(f.fileno())
    os.replace(written, path)
    _fsync_dir(os.path.dirname(path))


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb"):
    """Open a temporary file next to `path` for writing; on a clean exit it replaces `path`.

    mode is "wb" (bytes) or "w" (UTF-8 text). Yields the open file object.
    """
    if mode not in ("wb", "w"):
        raise ConfigError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    path = os.path.abspath(path)
    tmp = _reserve(path, ".tmp", _new_file)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        _commit(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a file name for a writer that takes a name rather than a file object (the safetensors
    library); on a clean exit that file replaces `path` as with atomic_write (IO-1).

    The library writes its own temporary file (`.tmpXXXXXX`, mode 0600, never fsynced) next to the
    name it is given and renames it. So the name yielded lies in a private folder
    `.<name>.<random>.tmp`: a killed writer leaves only that folder, under a name IO-1 allows, and
    the finished file gets the mode open() gives (0666 less the umask) and an fsync before it
    replaces `path`.
    """
    path = os.path.abspath(path)
    folder = _reserve(path, ".tmp", os.mkdir)
    inner = os.path.join(folder, os.path.basename(path))
    try:
        _new_file(inner)
        mode = os.stat(inner).st_mode & 0o777  # what open() gives here, without touching the umask
        yield inner
        os.chmod(inner, mode)
        _commit(inner, path)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)


def atomic_write_json(path: str, obj) -> None:
    """Write `obj` as JSON (indent 2, sorted keys, trailing newline) with atomic_write."""
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    with atomic_write(path, "w") as f:
        f.write(text)


def read_json(path: str, missing: str):
    """The JSON value in `path`; CheckpointError(missing) when there is no such file, and one naming
    the file when it is not valid UTF-8 JSON."""
    if not os.path.isfile(path):
        raise CheckpointError(missing)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def _fsync_tree(folder: str) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def _merge_into(src: str, dst: str) -> None:
    """Move every entry of src into dst, replacing same-named files one at a time (sorted)."""
    for name in sorted(os.listdir(src)):
        s, d = os.path.join(src, name), os.path.join(dst, name)
        if os.path.isdir(s) and not os.path.islink(s) and os.path.isdir(d):
            _merge_into(s, d)
            os.rmdir(s)  # emptied by the merge
        else:
            os.replace(s, d)  # atomic per file; a file cannot replace a folder (raises)
    _fsync_dir(dst)


@contextlib.contextmanager
def atomic_save_dir(path: str):
    """Yield a temporary sibling folder to fill; on a clean exit its contents become `path`.

    - If `path` does not exist, the filled folder is renamed to `path` in one atomic step: a
      reader sees no folder or the complete new one.
    - If `path` is an existing folder, each file of the new folder replaces its namesake with
      os.replace, in sorted name order (sub-folders merged the same way). So every file is at
      each instant a complete old or new version, but the set of files is not switched at once:
      a crash half way leaves some files new and some old. Files in `path` that the new folder
      lacks are left as they are. All new files are fsynced before the first replace.
    - If the body raises, the temporary folder is deleted and `path` is untouched.
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{path}: exists and is not a folder; remove it or choose another path")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _reserve(path, ".tmpdir", os.mkdir)
    try:
        yield tmp
        _fsync_tree(tmp)
        if os.path.isdir(path):
            _merge_into(tmp, path)
            os.rmdir(tmp)  # empty now: every entry was moved
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(os.path.dirname(path))
