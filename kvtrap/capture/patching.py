"""Installing and removing method wrappers on SGLang classes, also for modules not imported yet.

Module-level functions can be wrapped too (:func:`module_function`): the name is replaced in that one
module (``setattr`` on the module) and put back on uninstall.

Why not SGLang's ``HookRegistry``: kvtrap must also arm in-process (``kvtrap.armed()``) and restore the
originals afterwards, and ``HookRegistry`` has no undo. Its ``_propagate_patch`` also rewrites module
globals that point at an original, which breaks code that keeps "the original" in a global (see the
notes). Here originals live in a dict keyed by (module, class, attribute), never in module globals.

Modules that are not imported yet are patched right after their import (a ``sys.meta_path`` finder
that wraps the loader), so arming never imports SGLang's attention backends itself: importing
``trtllm_mha_backend`` touches CUDA, and in a scheduler process that must happen after
``set_device``, i.e. when SGLang imports it.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

# marks a wrapper so it is never wrapped twice and the original can be found
ORIGINAL_ATTR = "__kvtrap_original__"


@dataclass(frozen=True)
class MethodTarget:
    """A method to wrap: ``module.cls.attr``; ``make_wrapper(original)`` returns the replacement."""

    module: str
    cls: str
    attr: str
    make_wrapper: Callable[[Any], Any]
    # True: the class has no such attribute yet (e.g. a descriptor over an instance attribute); it is
    # added on install and deleted on uninstall. ``make_wrapper`` then receives ``None``.
    add: bool = False

    @property
    def dotted(self) -> str:
        return f"{self.module}.{self.cls}.{self.attr}"


#: ``cls`` of a :class:`ModuleFunctionTarget`: the attribute lives on the module itself.
MODULE_LEVEL = "<module>"


@dataclass(frozen=True)
class ModuleFunctionTarget(MethodTarget):
    """A module-level name to wrap: ``module.attr`` (e.g. a function another module imported by name).

    Only the name in ``module`` is replaced; other modules that imported the same function keep theirs.
    Build it with :func:`module_function`. A subclass of :class:`MethodTarget` so that every list of
    targets (``all_targets``, the doctor) takes it unchanged; ``cls`` is :data:`MODULE_LEVEL`.
    """


def module_function(module: str, attr: str, make_wrapper: Callable[[Any], Any]) -> ModuleFunctionTarget:
    return ModuleFunctionTarget(module, MODULE_LEVEL, attr, make_wrapper)


@dataclass
class _Installed:
    target: MethodTarget
    owner: Any  # the class, or the module for a ModuleFunctionTarget
    original: Any  # the raw attribute from the class __dict__ (function, staticmethod, ...)


_ABSENT = object()  # marks an attribute kvtrap added (nothing to restore)
_lock = threading.RLock()
_installed: dict[tuple[str, str, str], _Installed] = {}
_pending: dict[str, list[MethodTarget]] = {}  # module name -> targets waiting for its import


def is_installed(target: MethodTarget) -> bool:
    return (target.module, target.cls, target.attr) in _installed


def _apply_module_function(target: MethodTarget, module: ModuleType) -> bool:
    key = (target.module, target.cls, target.attr)
    raw = module.__dict__.get(target.attr, _ABSENT)
    if raw is _ABSENT or not callable(raw):
        return False  # not in this SGLang version; the doctor reports it
    if getattr(raw, ORIGINAL_ATTR, None) is not None:
        return True
    wrapper = target.make_wrapper(raw)
    functools.update_wrapper(wrapper, raw)
    setattr(wrapper, ORIGINAL_ATTR, raw)
    # the original stays in _installed (a dict), never in a module global: SGLang's HookRegistry
    # rewrites module globals that point at a function it patches (see the notes)
    setattr(module, target.attr, wrapper)
    _installed[key] = _Installed(target, module, raw)
    return True


def _apply(target: MethodTarget, module: ModuleType) -> bool:
    key = (target.module, target.cls, target.attr)
    if key in _installed:
        return True
    if isinstance(target, ModuleFunctionTarget):
        return _apply_module_function(target, module)
    owner = getattr(module, target.cls, None)
    if not isinstance(owner, type):
        return False
    if target.add:
        if target.attr in owner.__dict__:
            return False  # SGLang grew an attribute of that name: do not shadow it
        setattr(owner, target.attr, target.make_wrapper(None))
        _installed[key] = _Installed(target, owner, _ABSENT)
        return True
    if target.attr not in owner.__dict__:
        return False  # not in this SGLang version; the doctor reports it
    raw = owner.__dict__[target.attr]
    if getattr(raw, ORIGINAL_ATTR, None) is not None:
        return True
    wrapper = target.make_wrapper(raw)
    if not isinstance(wrapper, (staticmethod, classmethod)):
        functools.update_wrapper(wrapper, raw)
    setattr(wrapper, ORIGINAL_ATTR, raw)
    setattr(owner, target.attr, wrapper)
    _installed[key] = _Installed(target, owner, raw)
    return True


def install(targets: list[MethodTarget]) -> None:
    """Wrap every target now if its module is imported, else right after the module's import."""
    with _lock:
        for target in targets:
            module = sys.modules.get(target.module)
            if module is not None and getattr(module, "__spec__", None) is not None and _module_ready(module):
                _apply(target, module)
            else:
                waiting = _pending.setdefault(target.module, [])
                if target not in waiting:
                    waiting.append(target)
        if _pending:
            _ensure_finder()


def uninstall(targets: list[MethodTarget]) -> None:
    """Put the originals back (and forget pending targets)."""
    with _lock:
        for target in targets:
            key = (target.module, target.cls, target.attr)
            rec = _installed.pop(key, None)
            if rec is not None and rec.original is _ABSENT:
                delattr(rec.owner, target.attr)
            elif rec is not None:
                setattr(rec.owner, target.attr, rec.original)
            waiting = _pending.get(target.module)
            if waiting and target in waiting:
                waiting.remove(target)
                if not waiting:
                    del _pending[target.module]
        if not _pending:
            _remove_finder()


def resolve(target: MethodTarget) -> tuple[bool, str]:
    """Import the target's module and say whether the method exists (used by ``kvtrap doctor``)."""
    try:
        module = importlib.import_module(target.module)
    except Exception as exc:  # any import failure is a finding, not a crash
        return False, f"cannot import {target.module}: {type(exc).__name__}: {exc}"
    owner = getattr(module, target.cls, None)
    if isinstance(target, ModuleFunctionTarget):
        if not callable(getattr(module, target.attr, None)):
            return False, f"{target.module} has no function {target.attr}"
        return True, "ok"
    if not isinstance(owner, type):
        return False, f"{target.module} has no class {target.cls}"
    if target.add:
        if target.attr in owner.__dict__:
            return False, f"{target.cls} already has {target.attr}: kvtrap will not shadow it"
        return True, "ok (added on arming)"
    if target.attr not in owner.__dict__:
        return False, f"{target.cls} has no method {target.attr}"
    return True, "ok"


def _module_ready(module: ModuleType) -> bool:
    # A module in sys.modules may still be executing (circular import); only patch finished ones.
    spec = module.__spec__
    return not getattr(spec, "_initializing", False)


# ------------------------------------------------------------------------------ post-import patching
class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        with _lock:
            for target in _pending.pop(module.__name__, []):
                _apply(target, module)
            if not _pending:
                _remove_finder()

    def __getattr__(self, name: str) -> Any:  # get_source, get_code, is_package, ...
        return getattr(self._inner, name)


def _apply_finished_pending() -> None:
    """Patch pending targets whose module is already in ``sys.modules`` and has finished executing.

    Those modules were mid-import when :func:`install` ran (arming from inside an import chain): the
    finder never sees them again, because Python serves a module in ``sys.modules`` without asking the
    meta path. The finder calls this on every later import instead, so they are patched as soon as the
    importing process moves on to any other module. Never blocks: an import inside ``_apply`` must not
    wait on the lock another thread holds while importing.
    """
    if not _lock.acquire(blocking=False):
        return
    try:
        for name in list(_pending):
            module = sys.modules.get(name)
            if module is None or getattr(module, "__spec__", None) is None or not _module_ready(module):
                continue
            for target in _pending.pop(name, []):  # a nested import may have taken it already
                _apply(target, module)
        # the finder stays in sys.meta_path even when nothing is pending: this runs while the import
        # system iterates that list, and removing an entry there would skip the next finder. An idle
        # finder costs one dict lookup per import; the next install/uninstall/exec_module tidies it.
    finally:
        _lock.release()


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        _apply_finished_pending()
        if fullname not in _pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and not isinstance(spec.loader, _PatchingLoader):
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


_finder = _PostImportFinder()


def _ensure_finder() -> None:
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def _remove_finder() -> None:
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
