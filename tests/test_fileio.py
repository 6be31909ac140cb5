"""Atomic writes (spec/io.md IO-1) and the never-unpickle rule (IO-4).

The kill test runs a child Python that rewrites an adapter-sized safetensors file in a loop and
SIGKILLs it at random instants; after each kill the file must be the last completed version or
the one being written, whole, never a mix. Its counts are printed past pytest's capture."""
import ast
import json
import os
import pathlib
import random
import signal
import stat
import time

import numpy as np
import pytest

from minipeft.errors import ConfigError
from minipeft.fileio import atomic_path, atomic_save_dir, atomic_write, atomic_write_json
from minipeft.safetensors_io import read_safetensors, write_safetensors

ROOT = pathlib.Path(__file__).resolve().parents[1]


def leftovers(folder):
    return sorted(p.name for p in pathlib.Path(folder).iterdir() if p.name.startswith("."))


@pytest.mark.spec("IO-1")
def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"old")
    with atomic_write(p) as f:
        f.write(b"new contents")
        assert p.read_bytes() == b"old"  # nothing visible until the block ends
    assert p.read_bytes() == b"new contents" and leftovers(tmp_path) == []
    umask = os.umask(0)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask  # like open(), not mkstemp's 0600


@pytest.mark.spec("IO-1")
@pytest.mark.parametrize("existed", [True, False])
def test_atomic_write_failure_keeps_previous_file(tmp_path, existed):
    p = tmp_path / "f.txt"
    if existed:
        p.write_text("previous")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(p, "w") as f:
            f.write("half of the new")
            raise RuntimeError("boom")
    assert (p.read_text() == "previous") if existed else not p.exists()
    assert leftovers(tmp_path) == []


@pytest.mark.spec("IO-1")
def test_atomic_write_fsyncs_file_then_renames_then_fsyncs_folder(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", stat.S_ISDIR(os.fstat(fd).st_mode))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", None)), real_replace(a, b)))
    with atomic_write(tmp_path / "f.bin") as f:
        f.write(b"x")
    assert events == [("fsync", False), ("replace", None), ("fsync", True)]


@pytest.mark.spec("IO-1")
def test_atomic_write_modes_and_json(tmp_path):
    with pytest.raises(ConfigError):
        with atomic_write(tmp_path / "a", "a"):
            pass
    atomic_write_json(tmp_path / "c.json", {"b": 1, "a": ["é"]})
    text = (tmp_path / "c.json").read_text(encoding="utf-8")
    assert json.loads(text) == {"b": 1, "a": ["é"]} and text.index('"a"') < text.index('"b"')
    assert text.endswith("}\n") and "é" in text


@pytest.mark.spec("IO-1")
def test_atomic_path_for_name_taking_writers(tmp_path, monkeypatch):
    """The safetensors library writes by name (its own 0600 temp file, renamed): atomic_path
    still gives open()'s mode, fsyncs before the rename, and leaves nothing behind."""
    p = tmp_path / "w.safetensors"
    p.write_bytes(b"old")
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", stat.S_ISDIR(os.fstat(fd).st_mode))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", pathlib.Path(b).name)),
                                                     real_replace(a, b)))
    write_safetensors(p, {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}, {"k": "v"})
    assert events[-3:] == [("fsync", False), ("replace", p.name), ("fsync", True)]
    tensors, meta = read_safetensors(p)
    assert meta == {"k": "v"} and tensors["x"].tolist() == [[0, 1, 2], [3, 4, 5]]
    umask = os.umask(0)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask and leftovers(tmp_path) == []
    with pytest.raises(OSError, match="disk full"):
        with atomic_path(p) as name:
            pathlib.Path(name).write_bytes(b"half")
            raise OSError("disk full")
    assert p.read_bytes()[:8] != b"half" and read_safetensors(p)[1] == {"k": "v"}
    assert leftovers(tmp_path) == []


@pytest.mark.spec("IO-1")
def test_atomic_save_dir_new_folder_appears_whole(tmp_path):
    target = tmp_path / "adapter"
    with atomic_save_dir(target) as tmp:
        assert not target.exists() and pathlib.Path(tmp).parent == tmp_path
        (pathlib.Path(tmp) / "a.txt").write_text("A")
        (pathlib.Path(tmp) / "sub").mkdir()
        (pathlib.Path(tmp) / "sub" / "b.txt").write_text("B")
    assert (target / "a.txt").read_text() == "A" and (target / "sub" / "b.txt").read_text() == "B"
    assert leftovers(tmp_path) == []


@pytest.mark.spec("IO-1")
def test_atomic_save_dir_replaces_file_by_file_and_keeps_others(tmp_path):
    target = tmp_path / "adapter"
    (target / "sub").mkdir(parents=True)
    for name, text in [("a.txt", "old A"), ("keep.txt", "K"), ("sub/b.txt", "old B")]:
        (target / name).write_text(text)
    with atomic_save_dir(target) as tmp:
        (pathlib.Path(tmp) / "sub").mkdir()
        (pathlib.Path(tmp) / "a.txt").write_text("new A")
        (pathlib.Path(tmp) / "sub" / "b.txt").write_text("new B")
        (pathlib.Path(tmp) / "c.txt").write_text("new C")
    got = {str(p.relative_to(target)): p.read_text() for p in target.rglob("*") if p.is_file()}
    assert got == {"a.txt": "new A", "keep.txt": "K", "sub/b.txt": "new B", "c.txt": "new C"}
    assert leftovers(tmp_path) == []


@pytest.mark.spec("IO-1")
def test_atomic_save_dir_failure_leaves_target_untouched(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "a.txt").write_text("old")
    with pytest.raises(KeyError):
        with atomic_save_dir(target) as tmp:
            (pathlib.Path(tmp) / "a.txt").write_text("new")
            raise KeyError("fail")
    assert (target / "a.txt").read_text() == "old" and leftovers(tmp_path) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        with atomic_save_dir(tmp_path / "file"):
            pass


def write_forever(path, gen, out_fd):
    """The child's loop: write generation after generation, reporting each finished one on out_fd."""
    tensors = adapter_like(gen)
    os.write(out_fd, b"ready\n")
    while True:
        gen += 1
        for a in tensors.values():
            a.fill(gen)
        write_safetensors(path, tensors, {"gen": str(gen)})
        os.write(out_fd, f"{gen}\n".encode())


def adapter_like(gen):
    """48 LoRA-shaped float32 tensors (6 MiB in all) filled with the generation number."""
    keys = [f"base_model.model.model.layers.{i}.self_attn.{m}_proj.lora_{ab}.weight"
            for i in range(8) for m in "qkv" for ab in "AB"]
    return {k: np.full((16, 2048) if k.endswith("A.weight") else (2048, 16), gen, np.float32) for k in keys}


def fork_writer(path, gen):
    """A forked child running write_forever (fork: no interpreter start-up per trial). Returns (pid, reader)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            os.close(r)
            write_forever(path, gen, w)
        finally:
            os._exit(0)
    os.close(w)
    return pid, os.fdopen(r, "r")


def check_whole(path, lo, hi):
    """The file loads, all its tensors hold one generation g, and lo <= g <= hi."""
    tensors, meta = read_safetensors(path)
    g = int(meta["gen"])
    assert lo <= g <= hi, (lo, g, hi)
    assert len(tensors) == 48 and all(a.shape in ((16, 2048), (2048, 16)) and (a == g).all() for a in tensors.values())
    return g


@pytest.mark.spec("IO-1")
@pytest.mark.slow
def test_sigkill_while_writing_never_leaves_half_a_file(tmp_path, capsys):
    path = tmp_path / "adapter_model.safetensors"
    gen, trials, mid_write, rng, start = 0, 0, 0, random.Random(0), time.monotonic()
    write_safetensors(path, adapter_like(1), {"gen": "1"})
    gen = check_whole(path, 1, 1)
    while trials < 20 or (trials < 60 and time.monotonic() - start < 15):
        before = set(leftovers(tmp_path))
        pid, out = fork_writer(str(path), gen)
        assert out.readline() == "ready\n"
        time.sleep(rng.uniform(0.0, 0.25))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        done = [int(line) for line in out.read().split()]
        out.close()
        last_done = done[-1] if done else gen
        mid_write += len(set(leftovers(tmp_path)) - before) > 0  # a temp file left: killed mid-write
        gen = check_whole(path, last_done, last_done + 1)  # the last completed write, or the next
        trials += 1
    names = sorted(p.name for p in tmp_path.iterdir())
    assert [n for n in names if n.endswith(".safetensors")] == [path.name]  # temps never look like it
    assert all(n.startswith(f".{path.name}.") and n.endswith(".tmp") for n in names if n != path.name)
    with capsys.disabled():
        print(f"\nIO-1 kill test: {trials} SIGKILLs, {mid_write} during a write (temp file left), "
              f"last generation {gen}, 0 files lost, {time.monotonic() - start:.1f} s")
    assert mid_write > 0


BANNED_MODULES = {"pickle", "_pickle", "cPickle", "dill", "joblib", "shelve", "cloudpickle"}


def unpickling_sites(source: str, filename: str):
    """Imports of pickle-like modules, torch.load calls, allow_pickle=True keywords."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in BANNED_MODULES:
            found.append(node.module)
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr == "load" and getattr(f.value, "id", None) == "torch":
                found.append("torch.load")
            if getattr(f, "id", getattr(f, "attr", None)) in ("__import__", "import_module") and node.args \
                    and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).split(".")[0] in BANNED_MODULES:
                found.append(f"import of {node.args[0].value}")
            found += ["allow_pickle=True" for k in node.keywords
                      if k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False)]
    return [f"{filename}:{s}" for s in found]


@pytest.mark.spec("IO-4")
def test_no_module_can_unpickle():
    assert unpickling_sites("import pickle\nimport torch\ntorch.load(f)\nnp.load(f, allow_pickle=True)", "x") == \
        ["x:pickle", "x:torch.load", "x:allow_pickle=True"]  # the checker itself catches each form
    files = sorted((ROOT / "minipeft").rglob("*.py"))
    assert files
    bad = [s for f in files for s in unpickling_sites(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))]
    assert bad == [], f"minipeft must never unpickle (spec/io.md IO-4): {bad}"
