"""Checkpoints under faults: a failure at every write step of a save (each mkdir, open, write, fsync, rename,
removal; ENOSPC, EROFS, EIO ...), a save SIGKILLed before each step, read-only targets, corrupt files and
arguments that cannot be stored. Afterwards the previous checkpoint loads bit-exact (its files byte-identical),
or the new one when the failure came after the commit rename, and no temporary directory passes for a
checkpoint."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import python_api as lk
from python_api.checkpoint import CONFIG_FILE, TENSOR_FILE, CheckpointError, checkpoint_info
from tests.python_api.fs_faults import OPS, Tracer
from tests.python_api.toy_models import toy

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
FAULT = {"mkdir": errno.EROFS, "open": errno.EACCES, "write": errno.ENOSPC, "fsync": errno.EIO,
         "replace": errno.EXDEV, "rmtree": errno.EBUSY}


def adapted(seed: int) -> torch.nn.Module:
    """The same base model (toy(0)) with adapters whose values depend on ``seed`` (shared A: one stored key)."""
    m = lk.apply_adapters(toy(0), TARGETS, r=4, alpha=8, share="A", modules_to_save=["classifier"])
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
    return m


X = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(7))


def files(d: str) -> dict[str, bytes]:
    return {f: open(os.path.join(d, f), "rb").read() for f in (CONFIG_FILE, TENSOR_FILE)}


def loads_as(path: str, model: torch.nn.Module) -> bool:
    with torch.no_grad():
        return torch.equal(lk.load_adapters(toy(0), path)(X), model(X))


def reference_trace(d: str, existing: bool) -> list[tuple[str, str]]:
    os.makedirs(d)
    if existing:
        lk.save_adapters(adapted(0), os.path.join(d, "ckpt"))
    with Tracer(d).installed() as t:
        lk.save_adapters(adapted(1), os.path.join(d, "ckpt"))
    return t.trace


def commit_index(trace, path: str) -> int:
    """The step that makes the new checkpoint visible: the rename of the temporary directory onto ``path``."""
    hits = [i for i, (op, p) in enumerate(trace)
            if op == "replace" and ".lk-saving-" in p and p.endswith(" -> " + path)]
    assert len(hits) == 1, trace
    return hits[0]


def check_leftovers_refused(d: str) -> None:
    for entry in sorted(os.listdir(d)):
        if entry == "ckpt":
            continue
        assert entry.startswith(".ckpt.lk-"), f"unexpected entry {entry} in {d}"
        with pytest.raises(CheckpointError, match=rf"{entry}.* temporary directory of an interrupted save_adapters"):
            lk.load_adapters(toy(0), os.path.join(d, entry))


def test_trace_covers_every_kind_of_write_step(tmp_path):
    trace = reference_trace(str(tmp_path / "t"), existing=True)
    path = str(tmp_path / "t" / "ckpt")
    assert {op for op, _ in trace} == set(OPS)
    c = commit_index(trace, path)
    # everything is written and fsynced (both files, then the directory) before the first rename
    first_rename = min(i for i, (op, _) in enumerate(trace) if op == "replace")
    for f in (CONFIG_FILE, TENSOR_FILE):
        assert [op for op, p in trace[:first_rename] if p.endswith(f)] [-1] == "fsync"
    assert trace[first_rename] == ("replace", f"{path} -> {tmp_path}/t/.ckpt.lk-previous") and c == first_rename + 1
    assert [op for op, _ in trace[c + 1:]] == ["open", "fsync", "rmtree"]   # parent fsync, then the old one goes


@pytest.mark.parametrize("existing", [True, False], ids=["over-old", "fresh"])
def test_failure_at_every_write_step(tmp_path, existing):
    path_of = lambda i: str(tmp_path / str(i) / "ckpt")  # noqa: E731
    trace = reference_trace(str(tmp_path / "ref"), existing)
    c = commit_index(trace, str(tmp_path / "ref" / "ckpt"))
    old, new = adapted(0), adapted(1)
    for i, (op, _) in enumerate(trace):
        d, path = str(tmp_path / str(i)), path_of(i)
        os.makedirs(d)
        if existing:
            lk.save_adapters(old, path)
            before = files(path)
        code = FAULT[op]

        def fail(j, op_j, p, i=i, code=code):
            if j == i:
                raise OSError(code, os.strerror(code), p)

        where = f"fault {errno.errorcode[code]} at step {i} ({op})"
        with Tracer(d, fail).installed() as t, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if op == "rmtree":   # after the commit, removing the old copy: the save stands, with a warning
                lk.save_adapters(new, path)
            else:
                with pytest.raises(OSError) as e:
                    lk.save_adapters(new, path)
                assert e.value.errno == code, where
                note = " ".join(getattr(e.value, "__notes__", []))
                assert path in note, where
        assert [s[0] for s in t.trace[:i + 1]] == [s[0] for s in trace[:i + 1]], where
        if i <= c:
            assert "nothing was written" in note, where
            if existing:
                assert files(path) == before, where            # byte-identical previous checkpoint
                assert loads_as(path, old), where
            else:
                assert not os.path.exists(path), where
            assert sorted(os.listdir(d)) == (["ckpt"] if existing else []), f"{where}: leftovers {os.listdir(d)}"
        else:
            assert loads_as(path, new), where
            if op == "rmtree":
                assert any("could not remove the previous checkpoint" in str(w.message) for w in caught), where
            else:
                assert "new checkpoint is in place" in note, where
            check_leftovers_refused(d)
            lk.save_adapters(old, path)                         # the next save clears what is left
            assert sorted(os.listdir(d)) == ["ckpt"] and loads_as(path, old), where


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO])
def test_config_written_after_the_tensors_fails(tmp_path, code):
    # the case: the tensors are written, then writing the JSON fails (full disk, read-only ...)
    path = str(tmp_path / "ckpt")
    old = adapted(0)
    lk.save_adapters(old, path)
    before = files(path)

    def fail(j, op, p):
        if op == "write" and p.endswith(CONFIG_FILE):
            raise OSError(code, os.strerror(code), p)

    with Tracer(str(tmp_path), fail).installed(), pytest.raises(OSError, match=os.strerror(code)):
        lk.save_adapters(adapted(1), path)
    assert files(path) == before and loads_as(path, old) and os.listdir(tmp_path) == ["ckpt"]


def _permissions_enforced(d) -> bool:
    probe = os.path.join(d, "probe")
    os.mkdir(probe, 0o555)
    try:
        os.mkdir(os.path.join(probe, "x"))
    except PermissionError:
        return True
    finally:
        os.chmod(probe, 0o755)
        shutil.rmtree(probe)
    return False


def test_read_only_directory_and_read_only_files(tmp_path):
    if not _permissions_enforced(tmp_path):
        pytest.skip("file permissions are not enforced for this user (root with CAP_DAC_OVERRIDE)")
    path = str(tmp_path / "ckpt")
    old, new = adapted(0), adapted(1)
    lk.save_adapters(old, path)
    before = files(path)
    os.chmod(tmp_path, 0o555)
    try:
        with pytest.raises(PermissionError, match="nothing was written"):
            lk.save_adapters(new, path)
    finally:
        os.chmod(tmp_path, 0o755)
    assert files(path) == before and loads_as(path, old)
    for f in (CONFIG_FILE, TENSOR_FILE):          # read-only files of the old checkpoint do not block a save
        os.chmod(os.path.join(path, f), 0o444)
    lk.save_adapters(new, path)
    assert loads_as(path, new) and os.listdir(tmp_path) == ["ckpt"]


def test_sigkill_before_every_step(tmp_path):
    trace = reference_trace(str(tmp_path / "ref"), existing=True)
    c = commit_index(trace, str(tmp_path / "ref" / "ckpt"))
    work = tmp_path / "kill"
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    steps = len(trace) + 1                           # the last child is not killed: the save completes
    res = subprocess.run([sys.executable, "-m", "tests.python_api.fs_faults", str(work), str(steps)],
                         capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    status = json.load(open(work / "status.json"))
    old, new = adapted(0), adapted(1)
    for k in range(steps):
        ref_old = work / f"old-{k}"
        d, where = str(work / str(k)), f"killed before step {k} ({trace[k][0] if k < len(trace) else 'none'})"
        path = os.path.join(d, "ckpt")
        assert status[str(k)] == ("killed" if k < len(trace) else "exit 0"), where
        if k == c:   # between the two renames: the old checkpoint is aside, and load reads it there
            assert not os.path.exists(path)
            assert files(os.path.join(d, ".ckpt.lk-previous")) == files(str(ref_old)), where
            with pytest.warns(UserWarning, match="save was interrupted"):
                assert loads_as(path, old), where
        elif k < c:
            assert files(path) == files(str(ref_old)), where
            assert loads_as(path, old), where
        else:
            assert loads_as(path, new), where
        check_leftovers_refused(d)
        lk.save_adapters(new, path)                  # recovery: the next save puts things straight
        assert os.listdir(d) == ["ckpt"] and loads_as(path, new), where


# ---- clear errors: corrupt files, what cannot be stored ----------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    path = str(tmp_path / "ckpt")
    lk.save_adapters(adapted(0), path)
    return path


def _edit_config(path, fn):
    p = os.path.join(path, CONFIG_FILE)
    cfg = json.load(open(p))
    cfg = fn(cfg)
    with open(p, "w") as f:
        json.dump(cfg, f)


def _truncate(p, frac=0.5):
    data = open(p, "rb").read()
    with open(p, "wb") as f:
        f.write(data[: int(len(data) * frac)])


def test_truncated_safetensors_is_named(saved):
    _truncate(os.path.join(saved, TENSOR_FILE))
    with pytest.raises(CheckpointError, match=rf"{TENSOR_FILE} is \d+ bytes, {CONFIG_FILE} records \d+.*truncated"):
        lk.load_adapters(toy(0), saved)


def test_truncated_safetensors_without_size_record_is_named(saved):
    _edit_config(saved, lambda c: {k: v for k, v in c.items() if k != "tensor_file"})
    for frac in (0.5, 0.001):   # cut inside the data, inside the header
        _truncate(os.path.join(saved, TENSOR_FILE), frac)
        with pytest.raises(CheckpointError, match=rf"{saved}/{TENSOR_FILE} is not a readable safetensors file"):
            lk.load_adapters(toy(0), saved)


def test_corrupt_safetensors_is_named(saved):
    p = os.path.join(saved, TENSOR_FILE)
    data = bytearray(open(p, "rb").read())
    data[-3] ^= 0xFF                                  # same size, one tensor byte flipped
    open(p, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{TENSOR_FILE} does not match the sha256"):
        lk.load_adapters(toy(0), saved)


@pytest.mark.parametrize("frac", [0.5, 0.0])
def test_truncated_json_is_named(saved, frac):
    _truncate(os.path.join(saved, CONFIG_FILE), frac)
    with pytest.raises(CheckpointError, match=rf"{saved}/{CONFIG_FILE} is not valid JSON \(truncated or corrupt\)"):
        lk.load_adapters(toy(0), saved)


@pytest.mark.parametrize("edit, msg", [
    (lambda c: {k: v for k, v in c.items() if k != "modules"}, "no 'modules' entry"),
    (lambda c: [c], "the top level is a list, expected an object"),
    (lambda c: 3, "the top level is a int, expected an object"),
    (lambda c: {**c, "modules": []}, "'modules' is a list, expected an object"),
    (lambda c: {**c, "modules": {}}, "'modules' is empty"),
    (lambda c: {**c, "format": "peft"}, "format is 'peft'"),
    (lambda c: {k: v for k, v in c.items() if k != "adaptation"}, "no 'adaptation' entry"),
    (lambda c: {**c, "modules": {**c["modules"], "layers.0.q_proj": {**c["modules"]["layers.0.q_proj"],
                                                                     "r": "4"}}},
     r"modules\['layers.0.q_proj'\]\['r'\] is '4', expected int"),
    (lambda c: {**c, "modules": {**c["modules"], "layers.0.q_proj": {
        k: v for k, v in c["modules"]["layers.0.q_proj"].items() if k != "in_features"}}},
     r"modules\['layers.0.q_proj'\] has no 'in_features'"),
    (lambda c: {**c, "allocator": [1]}, "'allocator' must be null or an object"),
], ids=["no-modules", "list", "int", "modules-list", "modules-empty", "format", "no-adaptation", "r-str",
        "no-in-features", "allocator-list"])
def test_malformed_config_is_named(saved, edit, msg):
    _edit_config(saved, edit)
    with pytest.raises(CheckpointError, match=rf"{saved}/{CONFIG_FILE}: .*{msg}"):
        lk.load_adapters(toy(0), saved)


class _Opaque:
    pass


@pytest.mark.parametrize("extra, exc, msg", [
    ({"a": [1, _Opaque()]}, TypeError, r"extra\['a'\]\[1\] is a .*_Opaque"),
    ({"a": {"b": {1, 2}}}, TypeError, r"extra\['a'\]\['b'\] is a builtins.set"),
    ({"n": np.int64(3)}, TypeError, r"extra\['n'\] is a numpy.int64"),
    ({"t": torch.ones(2)}, TypeError, r"extra\['t'\] is a torch.Tensor"),
    ({1: "x"}, TypeError, r"extra has the key 1 \(int\): JSON keys must be str"),
    ([1, 2], TypeError, "extra must be a dict or None, got list"),
], ids=["object", "set", "numpy-int", "tensor", "int-key", "list"])
def test_unstorable_extra_refused_before_any_write(tmp_path, saved, extra, exc, msg):
    before = files(saved)
    with Tracer(str(tmp_path)).installed() as t, pytest.raises(exc, match=msg):
        lk.save_adapters(adapted(1), saved, extra=extra)
    assert t.trace == [] and files(saved) == before and os.listdir(tmp_path) == ["ckpt"]
    with Tracer(str(tmp_path)).installed() as t, pytest.raises(exc, match=msg):
        lk.save_adapters(adapted(1), str(tmp_path / "fresh"), extra=extra)
    assert t.trace == [] and os.listdir(tmp_path) == ["ckpt"]


def test_circular_extra_and_bad_step_refused(saved):
    loop: dict = {}
    loop["self"] = loop
    with pytest.raises(ValueError, match=r"extra\['self'\] contains itself"):
        lk.save_adapters(adapted(1), saved, extra=loop)
    with pytest.raises(TypeError, match="step must be an int or None, got str"):
        lk.save_adapters(adapted(1), saved, step="3")
    with pytest.raises(TypeError, match="seed must be an int or None, got float"):
        lk.save_adapters(adapted(1), saved, seed=1.5)
    lk.save_adapters(adapted(1), saved, step=np.int64(4), extra={"t": (1, 2.5), "s": None})
    info = checkpoint_info(saved)
    assert info["step"] == 4 and info["extra"] == {"t": [1, 2.5], "s": None}


def test_target_that_is_not_a_checkpoint_directory(tmp_path):
    other = tmp_path / "run"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"run holds files that are not part of a lora-kernels checkpoint "
                                              r"\(\['notes.txt'\]\)"):
        lk.save_adapters(adapted(0), str(other))
    assert os.listdir(other) == ["notes.txt"] and sorted(os.listdir(tmp_path)) == ["run"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="file exists and is not a directory"):
        lk.save_adapters(adapted(0), str(tmp_path / "file"))
    with pytest.raises(CheckpointError, match="file is not a directory"):
        lk.load_adapters(toy(0), str(tmp_path / "file"))
    empty = tmp_path / "empty"
    empty.mkdir()
    lk.save_adapters(adapted(0), str(empty))       # an empty directory is fine: the rename replaces it
    assert loads_as(str(empty), adapted(0))


def test_temporary_directory_of_a_running_saver_is_left_alone(tmp_path):
    path = str(tmp_path / "ckpt")
    live = tmp_path / f".ckpt.lk-saving-{os.getppid():x}-0a0b0c0d"      # the parent process runs
    dead = tmp_path / ".ckpt.lk-saving-7fffffff-0a0b0c0d"                # no such pid (above pid_max)
    for d in (live, dead):
        d.mkdir()
        (d / TENSOR_FILE).write_bytes(b"partial")
    lk.save_adapters(adapted(0), path)
    assert sorted(os.listdir(tmp_path)) == sorted(["ckpt", live.name]) and loads_as(path, adapted(0))
    with pytest.raises(CheckpointError, match=f"{live.name} is a temporary directory.*load {path} instead"):
        lk.load_adapters(toy(0), str(live))
