"""Saved CartoState files: a checksum over every byte (a flipped byte anywhere raises ValueError
naming the file), sizes checked against the file before anything is allocated (a crafted small
file cannot make load allocate N-sized tensors), one copy of each tensor while loading, stale
temp files of killed saves removed by the next save, the folder fsynced after the rename, and
format version 1 files (no checksum) still read, with a warning."""
import hashlib
import json
import os
import pickle
import re
import stat
import struct
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gdc_ext import CartoState, _io, layout
from gdc_ext._state_legacy import LEGACY_VERSIONS, legacy_shapes
from gdc_ext.state import FORMAT_VERSION


def _trained(N=7, eps=(0.5, 1.0), extras=True):
    s = CartoState(N, burn_in=1, eps=list(eps), extras=extras)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        s.record(torch.rand(N, generator=g) * 3, torch.arange(N))
        s.end_epoch()
    s.record(torch.rand(3, generator=g), torch.arange(3))  # mid-epoch accumulators too
    return s


def _same(a, b):
    for name, t in a.tensors().items():
        assert torch.equal(t, b.tensors()[name]), name


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(the state, the bytes of its saved file, {region: (start, end)} of the file's byte ranges)."""
    s = _trained()
    p = tmp_path_factory.mktemp("saved") / "state.safetensors"
    s.save(p)
    data = p.read_bytes()
    (hlen,) = struct.unpack("<Q", data[:8])
    header = data[8:8 + hlen]
    stripped = header.rstrip(b" ")
    regions = {"length": (0, 8), "header": (8, 8 + hlen), "data": (8 + hlen, len(data))}
    if len(stripped) < hlen:
        regions["padding"] = (8 + len(stripped), 8 + hlen)
    meta_key, sum_key = b'"gdc_ext":"', b'"gdc_ext_sha256":"'
    if sum_key in header:  # the layout CartoState.save writes: metadata, checksum, then the tensor table
        meta_start = header.index(meta_key) + len(meta_key)
        sum_start = header.index(sum_key) + len(sum_key)
        regions["metadata"] = (8 + meta_start, 8 + header.index(b'",' + sum_key))
        regions["checksum"] = (8 + sum_start, 8 + sum_start + 64)
        regions["tensor table"] = (8 + sum_start + 66, 8 + len(stripped))
    for name, (a, b) in regions.items():
        assert 0 <= a < b <= len(data), name
    return s, data, regions


def test_round_trip_and_safetensors_compatible(saved, tmp_path):
    s, data, _ = saved
    p = tmp_path / "s.safetensors"
    p.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a version 3 file loads without the no-checksum warning
        r = CartoState.load(p)
    _same(s, r)
    assert r.scores().eps == (0.5, 1.0) and r.epochs_done == 2
    from safetensors import safe_open  # still a safetensors file for other tools

    with safe_open(str(p), framework="pt") as fh:
        meta = json.loads(fh.metadata()["gdc_ext"])
        assert meta["version"] == FORMAT_VERSION == 3
        for name in fh.keys():
            assert torch.equal(fh.get_tensor(name), s.tensors()[name])


def test_every_single_bit_flip_is_detected(saved, tmp_path):
    """Each byte of the file flipped in one bit (bit = position mod 8): ValueError naming the file."""
    _, data, _ = saved
    p = tmp_path / "flipped.safetensors"
    for pos in range(len(data)):
        b = bytearray(data)
        b[pos] ^= 1 << (pos % 8)
        p.write_bytes(bytes(b))
        with pytest.raises(ValueError, match=re.escape(str(p))):
            CartoState.load(p)


@settings(max_examples=150)
@given(region=st.sampled_from(["length", "header", "tensor table", "metadata", "checksum", "padding", "data"]),
       where=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255))
def test_any_byte_change_in_any_region_is_detected(saved, tmp_path_factory, region, where, mask):
    _, data, regions = saved
    if region not in regions:
        return
    a, b = regions[region]
    pos = a + int(where * (b - a))
    flipped = bytearray(data)
    flipped[pos] ^= mask
    p = tmp_path_factory.mktemp("flip") / "damaged.safetensors"
    p.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="damaged.safetensors"):
        CartoState.load(p)


def test_truncated_or_extended_file_is_rejected(saved, tmp_path):
    _, data, _ = saved
    p = tmp_path / "cut.safetensors"
    for cut in (data[:4], data[:8], data[:100], data[:-1], data + b"\0"):
        p.write_bytes(cut)
        with pytest.raises(ValueError, match="cut.safetensors"):
            CartoState.load(p)


# ------------------------------------------------------------------------------------- crafted files
def _file(meta: dict, table: dict, data: bytes, checksum: bool, pad_to: int = 5000) -> bytes:
    """A safetensors file with this header and data, padded to ``pad_to`` bytes by a filler metadata
    entry; with ``checksum``, the sha256 field computed as CartoState.save computes it (a crafted
    file can carry a valid checksum: the size checks must stand on their own)."""
    zero = "0" * 64

    def build(filler):
        extra = {"gdc_ext_sha256": zero} if checksum else {}
        header = {"__metadata__": {"gdc_ext": json.dumps(meta), **extra, "filler": "x" * filler}, **table}
        h = json.dumps(header, separators=(",", ":")).encode()
        h += b" " * (-len(h) % 8)
        return struct.pack("<Q", len(h)) + h + data

    out = build(0)
    out = build(max(0, pad_to - len(out)))
    if checksum:
        field = f'"gdc_ext_sha256":"{zero}"'.encode()
        out = out.replace(field, f'"gdc_ext_sha256":"{hashlib.sha256(out).hexdigest()}"'.encode())
    return out


def _meta(N, version):
    meta = {"format": "gdc_ext.CartoState", "version": version, "num_samples": N, "burn_in": 1, "eps": [0.5],
            "eps_scalar": True, "extras": True}
    if version >= 3:  # the compact layout lists its columns
        meta["columns"] = layout.saved_columns(layout.groups_for(True))
    return meta


_DT = {torch.float64: "F64", torch.float32: "F32", torch.int32: "I32", torch.int16: "I16", torch.int64: "I64"}


@pytest.fixture
def no_large_allocation(monkeypatch):
    """Fails the test if anything allocates a (non-meta) tensor of more than 10**6 elements."""
    limit = 10 ** 6

    def guard(fn):
        def wrapped(*size, **kw):
            shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
            n = 1
            for d in shape:
                n *= int(d)
            if n > limit and str(kw.get("device", "cpu")) != "meta":
                raise AssertionError(f"torch.{fn.__name__}{tuple(shape)} allocated while loading a crafted file")
            return fn(*size, **kw)
        wrapped.__name__ = fn.__name__
        return wrapped

    for name in ("zeros", "empty", "full", "ones"):
        monkeypatch.setattr(torch, name, guard(getattr(torch, name)))


@pytest.mark.parametrize("version", [1, FORMAT_VERSION])
@pytest.mark.parametrize("N", [10 ** 12, 3 * 10 ** 7])
def test_crafted_sizes_rejected_before_allocating(tmp_path, no_large_allocation, version, N):
    """A 5 kB file whose metadata claims N samples, its tensors being those of 5 samples (or its
    header claiming N rows the file does not hold): ValueError naming the file, raised before
    anything N-sized is allocated (it used to build an N-sample state first: 1.98 GB for a 5 kB
    file, or a RuntimeError from the allocator for N = 10**12)."""
    if version in LEGACY_VERSIONS:  # the float64 / int32 layout of those versions
        small = {name: torch.zeros(shape, dtype=dtype) for name, (dtype, shape) in legacy_shapes(_meta(5, version)).items()}
        small["eps"].fill_(0.5)
    else:
        small = CartoState(5, burn_in=1, eps=0.5, extras=True).state_dict()
        del small["meta"]
    table, blob = {}, b""
    for name in sorted(small, key=lambda n: (-small[n].element_size(), n)):
        raw = small[name].numpy().tobytes()
        table[name] = {"dtype": _DT[small[name].dtype], "shape": list(small[name].shape),
                       "data_offsets": [len(blob), len(blob) + len(raw)]}
        blob += raw
    claims_n = {k: dict(v, shape=[N] + v["shape"][1:] if k in ("acc", "fstats", "istats", "forgets")
                        else v["shape"]) for k, v in table.items()}
    for what, tab in (("meta", table), ("header", claims_n)):
        p = tmp_path / f"crafted_{what}.safetensors"
        p.write_bytes(_file(_meta(N, version), tab, blob, checksum=version >= 2))
        assert 4900 < p.stat().st_size < 5200
        with pytest.raises(ValueError, match=re.escape(p.name)):
            CartoState.load(p)


def test_huge_header_length_rejected(tmp_path, no_large_allocation):
    p = tmp_path / "hlen.safetensors"
    p.write_bytes(struct.pack("<Q", 2 ** 40) + b"{}" + b" " * 100)
    with pytest.raises(ValueError, match="hlen.safetensors"):
        CartoState.load(p)


def test_load_reads_each_tensor_once(tmp_path):
    """Peak memory of load: about one copy of the state (it used to hold a zeroed state, the read
    tensors and their clones: about three). Measured in a fresh process as the growth of its peak
    resident set (VmHWM, reset just before the load where Linux allows) over the load, for a
    ~100 MB state (3.5M samples of the compact layout's 30 bytes)."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc (Linux) to read the resident set size")
    s = CartoState(3_500_000, burn_in=1, eps=0.5)
    p = tmp_path / "big.safetensors"
    s.save(p)
    size = p.stat().st_size
    del s
    code = textwrap.dedent(f"""
        import torch
        from gdc_ext import CartoState
        torch.zeros(1)  # imports and the allocator settle before the baseline
        def status(key):
            with open("/proc/self/status") as fh:
                return next(int(line.split()[1]) for line in fh if line.startswith(key + ":")) * 1024
        try:  # resets the peak (VmHWM) to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            pass
        before = status("VmRSS")
        st = CartoState.load({str(p)!r})
        print(status("VmHWM") - before)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    grew = int(out.stdout.strip().splitlines()[-1])
    assert grew < 1.5 * size, f"load grew the peak RSS by {grew / size:.2f}x the file size ({size} bytes)"


# ------------------------------------------------------------------------------------- old versions
def test_version_1_file_loads_with_a_warning(tmp_path):
    """A file written as gdc_ext wrote it before the checksum (safetensors.save_file, version 1;
    tests/data/state_v1_extras.safetensors, the state of state_v2_extras.safetensors): loaded,
    converted to the compact layout, with a warning; saved again it is a checksummed version 3."""
    data = os.path.join(os.path.dirname(__file__), "data")
    with pytest.warns(UserWarning, match="format version 1.*without a checksum"):
        r = CartoState.load(os.path.join(data, "state_v1_extras.safetensors"))
    _same(CartoState.load(os.path.join(data, "state_v2_extras.safetensors")), r)
    p = tmp_path / "old.safetensors"
    r.save(p)  # saved again: version 3, checksummed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _same(r, CartoState.load(p))


def test_version_2_file_without_checksum_is_rejected(tmp_path):
    from safetensors.torch import save_file

    sd = _trained().state_dict()
    meta = sd.pop("meta")
    p = tmp_path / "nosum.safetensors"
    save_file(sd, str(p), metadata={"gdc_ext": json.dumps(meta)})
    with pytest.raises(ValueError, match="nosum.safetensors.*checksum"):
        CartoState.load(p)


def test_load_does_not_unpickle(saved, tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("load unpickled something")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    p = tmp_path / "s.safetensors"
    p.write_bytes(saved[1])
    _same(saved[0], CartoState.load(p))


# ------------------------------------------------------------------------------------- temp files
def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _temp_name(target: str, pid: int, prefix: str = ".gdc-state-") -> str:
    return f"{_io._temp_stem(target, prefix)}{pid}-abc123xy.tmp"


def test_stale_temp_of_a_dead_writer_is_removed_by_the_next_save(tmp_path):
    target = tmp_path / "state.safetensors"
    dead = tmp_path / _temp_name(str(target), _dead_pid())
    dead.write_bytes(b"x" * 1000)  # what a save killed mid-write leaves
    live_writer = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        live = tmp_path / _temp_name(str(target), live_writer.pid)
        live.write_bytes(b"y")  # a concurrent save still writing: kept
        other_target = tmp_path / _temp_name(str(tmp_path / "other.safetensors"), _dead_pid())
        other_target.write_bytes(b"z")  # another file's temp: not this save's business
        unrelated = tmp_path / ".state.safetensors.notes.tmp"
        unrelated.write_bytes(b"u")
        _trained().save(target)
        assert not dead.exists()
        assert live.exists() and other_target.exists() and unrelated.exists()
        CartoState.load(target)
    finally:
        live_writer.communicate(b"")
    assert sorted(f.name for f in tmp_path.iterdir() if f.name.endswith(".tmp")) == sorted(
        [live.name, other_target.name, unrelated.name])


def test_save_killed_mid_write_leaves_a_temp_the_next_save_removes(tmp_path):
    """A real kill -9 during a save (the writer signals once it has written part of the file, then
    blocks): the temp it leaves is removed by the next save of the same file."""
    target = tmp_path / "state.safetensors"
    code = textwrap.dedent(f"""
        import sys
        from gdc_ext._io import write_atomic
        def write(tmp):
            with open(tmp, "wb") as fh:
                fh.write(b"partial" * 1000)
                fh.flush()
            print(tmp, flush=True)
            sys.stdin.read()  # blocks until killed
        write_atomic({str(target)!r}, write, prefix=".gdc-state-")
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        tmp = proc.stdout.readline().strip()
        assert tmp and os.path.exists(tmp)
    finally:
        proc.kill()
        proc.wait()
    assert os.path.exists(tmp) and not target.exists()  # the killed save left its temp
    _trained().save(target)
    assert not os.path.exists(tmp)
    assert [f.name for f in tmp_path.iterdir()] == [target.name]


def test_temp_names_are_unique_and_name_the_target(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(os.path.basename(src))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    s = _trained()
    for _ in range(3):
        s.save(tmp_path / "state.safetensors")
    assert len(set(seen)) == 3
    for name in seen:
        assert name.startswith(".state.safetensors.gdc-state-") and f"-{os.getpid()}-" in name


def test_folder_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    """The temp file is fsynced before the rename, the folder after it (else the rename itself can
    be lost in a power cut). Each fsync is recorded by what its fd is (folder or file, inode)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def spy_fsync(fd):
        st_ = os.fstat(fd)
        events.append(("fsync", "folder" if stat.S_ISDIR(st_.st_mode) else "file", st_.st_ino))
        return real_fsync(fd)

    def spy_replace(src, dst):
        events.append(("replace", os.fspath(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    target = tmp_path / "state.safetensors"
    _trained().save(target)
    i = events.index(("replace", str(target)))
    assert ("fsync", "file", target.stat().st_ino) in events[:i], f"the file is not fsynced before the rename: {events}"
    assert ("fsync", "folder", tmp_path.stat().st_ino) in events[i + 1:], \
        f"the folder is not fsynced after the rename: {events}"
