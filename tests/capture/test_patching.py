"""kvtrap.capture.patching on throwaway modules: wrap now, wrap after import, and wrap a module that was mid-import
when armed (arming from inside an import chain, e.g. a plugin loaded while SGLang imports itself)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from kvtrap.capture import patching
from kvtrap.capture.patching import ORIGINAL_ATTR, MethodTarget


def _wrap(original):
    def wrapper(self, *args, **kwargs):
        return ("wrapped", original(self, *args, **kwargs))

    return wrapper


@pytest.fixture
def modpath(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [n for n in sys.modules if n.startswith("kvtrap_tmp_")]:
        del sys.modules[name]


def _write(path: Path, name: str, body: str) -> None:
    (path / f"{name}.py").write_text(textwrap.dedent(body))


def test_wraps_an_imported_module_now_and_restores(modpath: Path) -> None:
    _write(modpath, "kvtrap_tmp_now", "class C:\n    def f(self):\n        return 1\n")
    import kvtrap_tmp_now as m

    target = MethodTarget("kvtrap_tmp_now", "C", "f", _wrap)
    patching.install([target])
    try:
        assert m.C().f() == ("wrapped", 1)
    finally:
        patching.uninstall([target])
    assert m.C().f() == 1 and not hasattr(m.C.f, ORIGINAL_ATTR)


def test_wraps_a_module_right_after_its_import(modpath: Path) -> None:
    _write(modpath, "kvtrap_tmp_later", "class C:\n    def f(self):\n        return 2\n")
    target = MethodTarget("kvtrap_tmp_later", "C", "f", _wrap)
    patching.install([target])
    try:
        assert "kvtrap_tmp_later" not in sys.modules  # arming imported nothing
        import kvtrap_tmp_later as m

        assert m.C().f() == ("wrapped", 2)
    finally:
        patching.uninstall([target])


def test_wraps_a_module_that_was_mid_import_when_armed(modpath: Path) -> None:
    # the module arms kvtrap from its own top level, before its class exists: at that moment it is in
    # sys.modules but still executing, so it cannot be patched yet, and Python will never import it again
    _write(modpath, "kvtrap_tmp_mid", """
        from kvtrap.capture import patching
        from kvtrap.capture.patching import MethodTarget

        def _wrap(original):
            def wrapper(self):
                return ("wrapped", original(self))
            return wrapper

        TARGET = MethodTarget("kvtrap_tmp_mid", "C", "f", _wrap)
        patching.install([TARGET])

        class C:
            def f(self):
                return 3
        """)
    _write(modpath, "kvtrap_tmp_next", "X = 1\n")
    import kvtrap_tmp_mid as m

    try:
        assert m.C().f() == 3  # nothing imported since: still pending
        assert "kvtrap_tmp_mid" in patching._pending
        import kvtrap_tmp_next  # noqa: F401  # the process moves on to any other import

        assert m.C().f() == ("wrapped", 3)
        assert patching.is_installed(m.TARGET) and "kvtrap_tmp_mid" not in patching._pending
    finally:
        patching.uninstall([m.TARGET])
    assert m.C().f() == 3


def test_kvtrap_wraps_each_sglang_method_once() -> None:
    # one hook per SGLang method: e.g. the step drain (device guard records of every guarded backend, allocator
    # findings) is one wrapper on process_batch_result_decode, not one per feature stacked on the same method
    from collections import Counter

    from kvtrap.capture.hooks import targets

    seen = Counter((t.module, t.cls, t.attr) for t in targets())
    assert [key for key, n in seen.items() if n > 1] == []
    assert seen[("sglang.srt.managers.scheduler_components.batch_result_processor", "SchedulerBatchResultProcessor",
                 "process_batch_result_decode")] == 1
