"""uzr.checkpoint: one safetensors + JSON checkpoint format for the controller and the gate."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from uzr.checkpoint import load_checkpoint, save_checkpoint

FMT, VERSION, WEIGHTS, META = "uzr.thing", 3, "thing.safetensors", "thing.json"
HINT = "delete the folder and run again with 'thing' in stages=[...] to retrain it"


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([float("nan"), float("inf"), -0.0, 1e-45])
    return {
        "1.proj.weight": torch.randn(5, 7, generator=g),
        "1.proj.bias": torch.cat([special, torch.randn(3, generator=g)]),
        "2.half": torch.randn(4, 3, generator=g).half(),
        "2.bf16": torch.randn(6, generator=g).bfloat16(),
        "2.steps": torch.arange(-3, 9, dtype=torch.int64),
        "2.mask": torch.tensor([True, False, True]),
        "2.strided": torch.randn(6, 4, generator=g).t(),  # not contiguous
    }


def save(folder: Path, meta: dict | None = None) -> Path:
    return save_checkpoint(folder, WEIGHTS, META, tensors(), meta or {"student": "s", "layers": [2, 5]},
                           FMT, VERSION)


def load(folder: Path, expected: dict | None = None):
    return load_checkpoint(folder, WEIGHTS, META, FMT, VERSION, expected, HINT)


def edit_meta(folder: Path, **changes) -> None:
    meta = json.loads((folder / META).read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    (folder / META).write_text(json.dumps(meta))


def refused(folder: Path, error=ValueError, pattern: str = "", expected: dict | None = None) -> str:
    with pytest.raises(error, match=pattern) as err:
        load(folder, expected)
    assert str(err.value).endswith(HINT), err.value  # every refusal says how to fix it
    return str(err.value)


def test_round_trip_is_bit_exact_and_keeps_metadata(tmp_path):
    out = save(tmp_path / "ckpt", {"student": "s", "layers": [2, 5], "spec": {"arch": "bilinear", "lr": 1e-3}})
    assert out == tmp_path / "ckpt"
    assert sorted(p.name for p in out.iterdir()) == [META, WEIGHTS]  # no temporaries left
    loaded, meta = load(out, expected={"student": "s", "layers": (2, 5)})  # a tuple matches the stored list
    original = tensors()
    assert sorted(loaded) == sorted(original)
    for name, t in original.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape
        as_bytes = loaded[name].contiguous().view(torch.uint8) if t.dtype != torch.bool else loaded[name]
        want = t.contiguous().view(torch.uint8) if t.dtype != torch.bool else t
        assert torch.equal(as_bytes, want), name  # bit-exact, NaN and -0.0 included
    assert meta == {"student": "s", "layers": [2, 5], "spec": {"arch": "bilinear", "lr": 1e-3}, "format": FMT,
                    "format_version": VERSION,
                    "weights_sha256": hashlib.sha256((out / WEIGHTS).read_bytes()).hexdigest()}
    assert meta == json.loads((out / META).read_text())
    assert (out / WEIGHTS).stat().st_mode & 0o777 == 0o644 and (out / META).stat().st_mode & 0o777 == 0o644


def test_save_validates_before_writing_anything(tmp_path):
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        save(tmp_path / "a", {"student": "s", "path": Path("/x")})
    with pytest.raises(ValueError, match=r"metadata\['format'\]='uzr.other' contradicts"):
        save(tmp_path / "b", {"format": "uzr.other"})
    with pytest.raises(TypeError, match="mapping of names to tensors"):
        save_checkpoint(tmp_path / "c", WEIGHTS, META, {"w": [1.0, 2.0]}, {}, FMT, VERSION)
    assert not any((tmp_path / name).exists() for name in "abc")
    # an existing checkpoint stays untouched by a refused save
    good = save(tmp_path / "d")
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    with pytest.raises(TypeError):
        save(good, {"student": object()})
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before


def test_saving_loaded_metadata_again_recomputes_the_hash(tmp_path):
    _, meta = load(save(tmp_path / "a"))
    t = tensors()
    t["2.steps"] += 1
    save_checkpoint(tmp_path / "b", WEIGHTS, META, t, meta, FMT, VERSION)
    loaded, meta_b = load(tmp_path / "b")
    assert meta_b["weights_sha256"] != meta["weights_sha256"] and torch.equal(loaded["2.steps"], t["2.steps"])


@pytest.mark.parametrize("name", [META, WEIGHTS])
def test_missing_file(tmp_path, name):
    folder = save(tmp_path)
    (folder / name).unlink()
    message = refused(folder, FileNotFoundError, rf"thing checkpoint incomplete: {re.escape(str(folder / name))} "
                                                 r"is missing")
    assert f"holding {WEIGHTS} and {META}" in message


def test_metadata_that_is_not_json(tmp_path):
    folder = save(tmp_path)
    text = (folder / META).read_text()
    (folder / META).write_text(text[: len(text) // 2])  # truncated
    refused(folder, ValueError, rf"{re.escape(str(folder / META))} is not valid JSON .*the checkpoint is damaged")
    (folder / META).write_bytes(b"\xff\xfe{")  # not even text
    refused(folder, ValueError, "is not valid JSON")


def test_metadata_of_another_format_or_version(tmp_path):
    folder = save(tmp_path)
    edit_meta(folder, format="uzr.gate")
    refused(folder, ValueError, rf"{re.escape(str(folder / META))} is not a uzr.thing checkpoint "
                                r"\(format='uzr.gate'\)")
    (folder / META).write_text("[1, 2]")
    refused(folder, ValueError, r"is not a uzr.thing checkpoint \(format='list'\)")
    save(folder)
    edit_meta(folder, format_version=VERSION + 1)
    refused(folder, ValueError, rf"format_version={VERSION + 1}, this uzr reads {VERSION}")


@pytest.mark.parametrize(("field", "now", "shown"), [
    ("student", "other", "student='s' in the checkpoint, student='other' now"),
    ("layers", [2], r"layers=\[2, 5\] in the checkpoint, layers=\[2\] now"),
    ("hidden_size", 48, "hidden_size=None in the checkpoint, hidden_size=48 now"),
])
def test_expected_field_mismatch_names_the_field_and_both_values(tmp_path, field, now, shown):
    folder = save(tmp_path)
    message = refused(folder, ValueError, rf"thing checkpoint {re.escape(str(folder))} does not match this run: "
                                          + shown, expected={"student": "s", field: now})
    assert "made for another configuration" in message


def test_edited_metadata_without_hash_is_refused(tmp_path):
    folder = save(tmp_path)
    edit_meta(folder, weights_sha256=None)
    refused(folder, ValueError, rf"{re.escape(str(folder / META))} records no weights_sha256")


class Evil:
    """Pickles to a shell command that creates ``marker``: unpickling it would run code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("kind", ["torch.save zip archive", "pickle"])
def test_pickle_renamed_to_safetensors_is_refused_before_parsing(tmp_path, kind):
    folder = save(tmp_path / "ckpt")
    marker = tmp_path / "ran"
    payload = {"1.proj.weight": torch.ones(2), "x": Evil(marker)}
    if kind == "pickle":
        (folder / WEIGHTS).write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, folder / WEIGHTS)
    # the attacker also rewrote the recorded hash, so only the file format gives it away
    edit_meta(folder, weights_sha256=hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest())
    refused(folder, ValueError, rf"refusing to load {re.escape(str(folder / WEIGHTS))}: it is a {kind}, not a "
                                r"safetensors file\. uzr reads thing weights only with safetensors and never "
                                r"unpickles them")
    assert not marker.exists(), "the pickled payload ran"


def test_damaged_safetensors_header(tmp_path):
    folder = save(tmp_path)
    blob = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(blob[:5])
    refused(folder, ValueError, rf"{re.escape(str(folder / WEIGHTS))} is not a valid safetensors file "
                                r"\(damaged or truncated header, 5 bytes\)")
    (folder / WEIGHTS).write_bytes((10**9).to_bytes(8, "little") + blob[8:])  # header longer than the file
    refused(folder, ValueError, r"not a valid safetensors file")


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_weights_that_do_not_match_the_recorded_hash(tmp_path, damage):
    folder = save(tmp_path)
    blob = bytearray((folder / WEIGHTS).read_bytes())
    if damage == "truncated":
        blob = blob[: len(blob) - 7]
    else:
        blob[-3] ^= 0xFF
    (folder / WEIGHTS).write_bytes(bytes(blob))
    refused(folder, ValueError, rf"{re.escape(str(folder / WEIGHTS))} does not match the sha256 recorded in "
                                rf"{re.escape(str(folder / META))}: the weights file is truncated, modified")


def test_unparseable_weights_with_a_matching_hash(tmp_path):
    """A header that starts like safetensors but is not: safetensors' own error becomes a clear one."""
    folder = save(tmp_path)
    bad = (10).to_bytes(8, "little") + b"{not json}" + b"\0" * 16
    (folder / WEIGHTS).write_bytes(bad)
    edit_meta(folder, weights_sha256=hashlib.sha256(bad).hexdigest())
    refused(folder, ValueError, rf"cannot read {re.escape(str(folder / WEIGHTS))}: .*the file is damaged")
