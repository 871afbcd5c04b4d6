"""Dump round trip, caps, atomic writes, and clear errors on malformed dumps (never unpickling)."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from kvtrap.config import Config
from kvtrap.dumpfile import MANIFEST, TENSORS, DumpError, find_dumps, load_dump, reset_dump_count, write_dump
from kvtrap.errors import Violation

V = Violation(kind="page_table_out_of_range", summary="test", layer_id=3, row=1, column=2, value=99, bound=17)


@pytest.fixture(autouse=True)
def _fresh_counter():
    reset_dump_count()
    yield
    reset_dump_count()


def write(tmp_path, **cfg):
    config = Config(dump_dir=tmp_path, **cfg)
    tensors = {"page_table": np.arange(12, dtype=np.int32).reshape(3, 4), "big": np.zeros(300_000, np.int64)}
    return write_dump(V, {"hook": "test", "nested": {"a": [1, 2]}}, tensors, config)


def test_round_trip(tmp_path):
    path = write(tmp_path)
    dump = load_dump(path)
    assert dump.violation == V
    assert dump.context == {"hook": "test", "nested": {"a": [1, 2]}}
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
