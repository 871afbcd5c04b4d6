"""Dump round trip, caps, atomic writes, and clear errors on malformed dumps (never unpickling)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from kvtrap.config import Config
from kvtrap.record.context import Context, LayerInfo
from kvtrap.record.dumpfile import (
    MANIFEST,
    TENSORS,
    DumpError,
    find_dumps,
    load_dump,
    reset_dump_count,
    write_dump,
)
from kvtrap.record.violation import Violation

V = Violation(kind="page_table_out_of_range", summary="test", layer_id=3, row=1, column=2, value=99, bound=17)


@pytest.fixture(autouse=True)
def _fresh_counter():
    reset_dump_count()
    yield
    reset_dump_count()


def write(tmp_path, **cfg):
    config = Config(dump_dir=tmp_path, **cfg)
    tensors = {"page_table": np.arange(12, dtype=np.int32).reshape(3, 4), "big": np.zeros(300_000, np.int64)}
    return write_dump(V, Context(hook="test", layer=LayerInfo(3, "swa", 512, 0), args={"a": [1, 2]}), tensors, config)


def test_round_trip(tmp_path):
    path = write(tmp_path)
    dump = load_dump(path)
    assert dump.violation == V
    assert dump.manifest["context"] == {"hook": "test", "layer": {"id": 3, "type": "swa", "window": 512, "index_in_pool": 0},
                                        "args": {"a": [1, 2]}}
    # read back as the typed pieces it was written from; what the writer left out is None
    assert dump.context.layer == LayerInfo(3, "swa", 512, 0) and dump.context.hook == "test"
    assert dump.context.pools is None and dump.context.args == {"a": [1, 2]}
    assert dump.record.schema_version == 1 and dump.record.tensors["page_table"].shape == [3, 4]
    assert (dump.tensors["page_table"] == np.arange(12).reshape(3, 4)).all()
    assert dump.manifest["schema_version"] == 1 and dump.manifest["pid"] > 0
    assert load_dump(path / MANIFEST).path == path
    assert find_dumps([tmp_path]) == [path]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_size_cap_leaves_out_largest_tensors(tmp_path):
    dump = load_dump(write(tmp_path, max_dump_mb=1))
    assert "big" in dump.manifest["tensors_omitted"] and "big" not in dump.tensors
    assert "page_table" in dump.tensors


def test_count_cap(tmp_path):
    assert write(tmp_path, max_dumps=1) is not None
    assert write(tmp_path, max_dumps=1) is None


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: (p / MANIFEST).write_bytes(b'{"schema": "kvtrap.dump", "sch'), "not valid JSON"),
        (lambda p: (p / TENSORS).unlink(), "missing, but the manifest lists"),
        (lambda p: (p / TENSORS).write_bytes(b"\x80\x04 pickle bytes"), "cannot be read"),
        (lambda p: _edit(p, schema_version=2), "newer than this kvtrap reads"),
        (lambda p: _edit(p, schema="other"), "not a kvtrap manifest"),
        (lambda p: _edit(p, violation="x"), "malformed"),
        (lambda p: (p / MANIFEST).unlink(), "no manifest.json"),
    ],
)
def test_malformed_dumps_give_one_clear_error(tmp_path, damage, message):
    path = write(tmp_path)
    damage(path)
    with pytest.raises(DumpError, match=message):
        load_dump(path)


def _edit(path, **changes):
    m = orjson.loads((path / MANIFEST).read_bytes())
    m.update(changes)
    (path / MANIFEST).write_bytes(orjson.dumps(m))


def test_not_a_dump(tmp_path):
    with pytest.raises(DumpError, match="no such file"):
        load_dump(tmp_path / "nope")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(DumpError, match="not a kvtrap dump"):
        load_dump(tmp_path / "f.txt")


#: (field path as the error names it, manifest edit): right shape, wrong JSON type
WRONG_TYPES = [
    ("manifest.context", lambda m: m.update(context=["hook"])),
    ("manifest.context.tables", lambda m: m["context"].update(tables=[1, 2])),
    ("manifest.context.pools.full", lambda m: m["context"].update(pools={"full": "64 pages"})),
    ("manifest.context.layer.id", lambda m: m["context"]["layer"].update(id="3")),
    ("manifest.context.batch_size", lambda m: m["context"].update(batch_size="3")),
    ("manifest.violation.rows[0]", lambda m: m["violation"].update(rows=["1"])),
    ("manifest.violation.count", lambda m: m["violation"].update(count="12")),
    ("manifest.violation.value", lambda m: m["violation"].update(value=[99])),
    ("manifest.violation.details", lambda m: m["violation"].update(details=[1])),
    ("manifest.violation.details.overflow", lambda m: m["violation"].update(details={"overflow": [1, 2]})),
    ("manifest.violation: required field 'summary'", lambda m: m["violation"].pop("summary")),
    ("manifest.config", lambda m: m.update(config=["raise"])),
    ("manifest.config.inject", lambda m: m["config"].update(inject="sglang-26957")),
    ("manifest.versions", lambda m: m.update(versions=["0.1.0"])),
    ("manifest.versions.sglang", lambda m: m["versions"].update(sglang=5)),
    ("manifest.gpu", lambda m: m.update(gpu="H200")),
    ("manifest.tensors", lambda m: m.update(tensors=["page_table"])),
    ("manifest.tensors.page_table.shape", lambda m: m["tensors"]["page_table"].update(shape="3x4")),
    ("manifest.tensors_omitted.big", lambda m: m["tensors_omitted"].update(big=3)),
    ("manifest.time", lambda m: m.update(time="yesterday")),
    ("manifest.kind", lambda m: m.update(kind=1)),
]


@pytest.mark.parametrize("field, edit", WRONG_TYPES, ids=[f for f, _ in WRONG_TYPES])
def test_wrong_typed_manifest_is_a_dump_error_naming_the_field(tmp_path, field, edit):
    path = write(tmp_path, max_dump_mb=1)
    m = orjson.loads((path / MANIFEST).read_bytes())
    edit(m)
    (path / MANIFEST).write_bytes(orjson.dumps(m))
    with pytest.raises(DumpError) as err:
        load_dump(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path / MANIFEST}: {field}")


def test_float_page_table_is_refused(tmp_path):
    config = Config(dump_dir=tmp_path)
    path = write_dump(V, Context(hook="test"), {"page_table": np.zeros((2, 3), np.float32)}, config)
    with pytest.raises(DumpError, match="'page_table' holds float32, expected integers"):
        load_dump(path)


def test_unreadable_files_name_the_real_cause(tmp_path, monkeypatch):
    path = write(tmp_path)
    real = Path.read_bytes

    def denied(self: Path) -> bytes:
        if self.name in (MANIFEST, TENSORS):  # the OS refusing the read, as for a file of another user
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(DumpError, match=r"manifest.json: cannot be read \(Permission denied\)") as err:
        load_dump(path)
    assert "truncated" not in str(err.value)


def test_unknown_fields_and_kinds_from_a_newer_writer_are_read(tmp_path):
    path = write(tmp_path)
    m = orjson.loads((path / MANIFEST).read_bytes())
    m["context"]["new_piece"] = {"anything": [1]}
    m["violation"]["kind"] = "a_kind_from_the_future"
    m["kind"] = "a_kind_from_the_future"
    (path / MANIFEST).write_bytes(orjson.dumps(m))
    dump = load_dump(path)
    assert dump.violation.kind == "a_kind_from_the_future"
    assert dump.manifest["context"]["new_piece"] == {"anything": [1]}
