"""Named per-sample references stored in a CartoState file (issue 22: "references are saved with the
state"): ``CartoState.save(path, references={name: ref})`` writes them as an optional section of the
same atomic, checksummed file; ``CartoState.load_references`` reads them back bit for bit; files
without them (every older file) read as before, ``CartoState.load`` ignores them; bad input is
refused before anything is written; damage gives a clear error; ``Cartographer.save_state`` and the
Hugging Face checkpoint writer store the Cartographer's reference."""
import json
import os
from pathlib import Path
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gdc_ext
from gdc_ext import _state_references
from gdc_ext._state_file import read_state_file, write_state_file


def _trained(N=9, eps=(0.5, 1.0), seed=0):
    s = gdc_ext.CartoState(N, burn_in=1, eps=list(eps))
    g = torch.Generator().manual_seed(seed)
    for _ in range(3):
        s.record(torch.rand(N, generator=g, dtype=torch.float64).float() * 3, torch.arange(N))
        s.end_epoch()
    return s


def _same_state(a, b):
    da, db = a.state_dict(), b.state_dict()
    assert da.pop("meta") == db.pop("meta")
    for k in da:
        assert torch.equal(da[k], db[k]), k


@settings(max_examples=25, deadline=None)
@given(N=st.integers(1, 50), k=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_round_trip_bit_exact_in_order(tmp_path_factory, N, k, seed):
    path = tmp_path_factory.mktemp("refs") / "s.safetensors"
    s = _trained(N)
    rng = np.random.default_rng(seed)
    names = [f"r{j}.{rng.integers(1000)}-x_{j}" for j in range(k)][::-1]  # not in sorted order
    refs = {n: rng.standard_normal(N) * 10.0 ** rng.integers(-300, 300) for n in names}
    s.save(path, references=refs)
    got = gdc_ext.CartoState.load_references(path)
    assert list(got) == names
    for n in names:
        assert got[n].dtype == torch.float64 and got[n].shape == (N,)
        assert got[n].numpy().tobytes() == refs[n].astype(np.float64).tobytes()  # bit for bit
    _same_state(gdc_ext.CartoState.load(path), s)  # the state reads as it was


def test_file_without_references_is_unchanged(tmp_path):
    """No references: the file is byte for byte what save wrote before the section existed (same
    tensors, same metadata), and load_references gives {}."""
    s = _trained()
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    s.save(a)
    s.save(b, references={})
    meta, tensors = read_state_file(str(a))
    assert "references" not in meta and not any(n.startswith("reference/") for n in tensors)
    c = tmp_path / "c.safetensors"
    write_state_file(str(c), {n: t.contiguous() for n, t in s.tensors().items()}, json.dumps(s._meta()))
    assert a.read_bytes() == b.read_bytes() == c.read_bytes()
    assert gdc_ext.CartoState.load_references(a) == {}


def test_version_1_file_has_no_references():
    """A file as gdc_ext wrote it before the checksum (format version 1): the committed fixture
    written by gdc_ext at 776d1c5 (tests/data)."""
    path = Path(__file__).parent / "data" / "state_v1_extras.safetensors"
    assert gdc_ext.CartoState.load_references(path) == {}


@pytest.mark.parametrize("refs, match", [
    ({"x": np.ones(8)}, r"references\['x'\]: reference must be a 1-D \[N = 9\].*got 8 values"),
    ({"x": [1.0] * 8 + [float("nan")]}, r"references\['x'\].*NaN/inf"),
    ({"x": np.ones((9, 1))}, r"references\['x'\].*shape \(9, 1\)"),
    ({"a b": np.ones(9)}, r"reference name must be a str"),
    ({"": np.ones(9)}, r"reference name must be a str"),
    ({3: np.ones(9)}, r"reference name must be a str"),
    ({"x" * 65: np.ones(9)}, r"reference name must be a str"),
    ([np.ones(9)], r"references must be a dict"),
])
def test_bad_references_refused_before_writing(tmp_path, refs, match):
    s = _trained()
    path = tmp_path / "s.safetensors"
    s.save(path, references={"kept": np.arange(9.0)})
    before = path.read_bytes()
    with pytest.raises(ValueError, match=match):
        s.save(path, references=refs)
    assert path.read_bytes() == before  # nothing written, the previous file intact
    assert sorted(os.listdir(tmp_path)) == ["s.safetensors"]  # no temp left


def test_any_changed_byte_of_a_reference_is_detected(tmp_path):
    s = _trained()
    path = tmp_path / "s.safetensors"
    s.save(path, references={"crossfit": np.linspace(0.5, 4.0, 9)})
    raw = bytearray(path.read_bytes())
    (hlen,) = struct.unpack("<Q", raw[:8])
    table = json.loads(raw[8:8 + hlen])
    begin, end = table["reference/crossfit"]["data_offsets"]
    for where in (begin, (begin + end) // 2, end - 1):
        bad = bytearray(raw)
        bad[8 + hlen + where] ^= 0x10
        path.write_bytes(bytes(bad))
        with pytest.raises(ValueError, match="checksum does not match"):
            gdc_ext.CartoState.load_references(path)
        with pytest.raises(ValueError, match="checksum does not match"):
            gdc_ext.CartoState.load(path)


def _crafted(path, s, refs: dict, names=None):
    """A file with a valid checksum whose references section a faulty writer filled: ``refs``
    {name: tensor as written}, ``names`` the metadata's list (default: refs' names)."""
    meta = s._meta()
    meta["references"] = list(refs) if names is None else names
    tensors = {n: t.contiguous() for n, t in s.tensors().items()}
    tensors.update({f"reference/{n}": t for n, t in refs.items()})
    write_state_file(str(path), tensors, json.dumps(meta))


def test_stored_reference_of_the_wrong_length_is_refused(tmp_path):
    s = _trained()
    path = tmp_path / "s.safetensors"
    _crafted(path, s, {"crossfit": torch.ones(8, dtype=torch.float64)})
    for read in (gdc_ext.CartoState.load_references, gdc_ext.CartoState.load):
        with pytest.raises(ValueError, match=r"tensor 'reference/crossfit' is .*\[8\].*implies .*\[9\]"):
            read(path)


def test_non_finite_stored_reference_names_file_and_reference(tmp_path):
    s = _trained()
    path = tmp_path / "s.safetensors"
    ref = torch.ones(9, dtype=torch.float64)
    ref[4] = float("inf")
    _crafted(path, s, {"ok": torch.ones(9, dtype=torch.float64), "initial": ref})
    with pytest.raises(ValueError, match=r"s.safetensors'.*stored reference 'initial' is damaged.*first at id 4"):
        gdc_ext.CartoState.load_references(path)
    _same_state(gdc_ext.CartoState.load(path), s)  # the state itself is fine


@pytest.mark.parametrize("names", [["x", "x"], "x", ["a b"], [3], ["x", "y"]])
def test_damaged_reference_metadata_is_refused(tmp_path, names):
    s = _trained()
    path = tmp_path / "s.safetensors"
    _crafted(path, s, {"x": torch.ones(9, dtype=torch.float64)}, names=names)
    match = "tensors .* expected" if names == ["x", "y"] else "damaged metadata: references"
    for read in (gdc_ext.CartoState.load_references, gdc_ext.CartoState.load):
        with pytest.raises(ValueError, match=match):
            read(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no state file"):
        gdc_ext.CartoState.load_references(tmp_path / "nope.safetensors")


def test_cartographer_save_state_stores_its_reference(tmp_path):
    N = 9
    ref = np.linspace(1.0, 3.0, N)
    carto = gdc_ext.Cartographer(N, burn_in=2, eps=1.0, reference=ref)
    carto.save_state(tmp_path / "given.safetensors")
    got = gdc_ext.CartoState.load_references(tmp_path / "given.safetensors")
    assert list(got) == ["given"] and np.array_equal(got["given"].numpy(), ref)

    later = gdc_ext.Cartographer(N, burn_in=2, eps=1.0, reference="later")
    later.save_state(tmp_path / "none.safetensors")  # not set yet: nothing stored
    assert gdc_ext.CartoState.load_references(tmp_path / "none.safetensors") == {}
    later.set_reference(ref)
    later.save_state(tmp_path / "later.safetensors")
    assert list(gdc_ext.CartoState.load_references(tmp_path / "later.safetensors")) == ["given"]

    plain = gdc_ext.Cartographer(N, burn_in=2, eps=1.0)
    plain.save_state(tmp_path / "plain.safetensors")
    assert gdc_ext.CartoState.load_references(tmp_path / "plain.safetensors") == {}
    assert plain.reference_name is None


def test_cartographer_initial_reference_is_named_initial(tmp_path):
    N = 6
    carto = gdc_ext.Cartographer(N, burn_in=2, eps=1.0, reference="initial")
    model = torch.nn.Sequential(torch.nn.Embedding(5, 5))
    torch.manual_seed(0)
    x = torch.randint(0, 5, (N, 4))
    ref = carto.score_reference(model, [(x[:, :-1], x[:, 1:], torch.arange(N))], progress=False)
    carto.save_state(tmp_path / "s.safetensors")
    got = gdc_ext.CartoState.load_references(tmp_path / "s.safetensors")
    assert list(got) == ["initial"] and torch.equal(got["initial"], ref)


def test_hf_checkpoint_state_file_carries_the_reference(tmp_path):
    pytest.importorskip("transformers")
    from gdc_ext.integrations.files import STATE_FILE
    from gdc_ext.integrations.hf import load_carto_checkpoint, save_carto_checkpoint

    N = 9
    ref = np.linspace(0.5, 2.5, N)
    carto = gdc_ext.Cartographer(N, burn_in=2, eps=1.0, reference=ref)
    save_carto_checkpoint(str(tmp_path / "checkpoint-3"), carto.state, carto, global_step=3)
    got = gdc_ext.CartoState.load_references(tmp_path / "checkpoint-3" / STATE_FILE)
    assert list(got) == ["given"] and np.array_equal(got["given"].numpy(), ref)
    again = gdc_ext.Cartographer(N, burn_in=2, eps=1.0, reference=ref)
    load_carto_checkpoint(str(tmp_path / "checkpoint-3"), again.state, again, global_step=3)  # resumes as before


def test_module_constants():
    assert _state_references.META_KEY == "references" and _state_references.PREFIX == "reference/"
