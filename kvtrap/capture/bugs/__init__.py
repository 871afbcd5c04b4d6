"""Historical SGLang bugs kvtrap re-introduces on purpose (``KVTRAP_INJECT``), so repros can prove a fix.

:data:`BUGS` is the explicit list: name -> a :class:`Listed` (the module whose ``BUG`` (a :class:`Bug`) knows
how to enable and disable the injection, plus a line and the upstream links for ``kvtrap repro list``). Reading the list imports nothing else (the modules need SGLang), so settings
refuse an unknown name at once (:class:`kvtrap.config.Config`). Fixes kvtrap applies by default are not
here: they live in :mod:`kvtrap.capture.fixes`. Adding a bug: one module with ``BUG``, one line here, an
explain rule in :mod:`kvtrap.report.explain`, a test, a sample (see CONTRIBUTING.md).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Listed:
    module: str
    what: str  # one line for `kvtrap repro list`
    links: tuple[str, ...]  # the upstream issue / PRs


_GH = "https://github.com/sgl-project/sglang/pull/"

BUGS: dict[str, Listed] = {
    "sglang-26957": Listed("kvtrap.capture.bugs.sglang_26957", "trtllm_mha frozen-KV MTP draft reads full-pool ids on SWA layers", ("https://github.com/sgl-project/sglang/issues/26957", _GH + "25103", _GH + "26966")),  # noqa: E501
    "sglang-38269": Listed("kvtrap.capture.bugs.sglang_38269", "request release sends window-evicted (unmapped) slots down the SWA segment free: the reserved SWA page 0 freed", (_GH + "38269", _GH + "38519", _GH + "38159")),  # noqa: E501
    "sglang-27779": Listed("kvtrap.capture.bugs.sglang_27779", "partial-page SWA free clears the freed tokens' mapping only: SWA page freed twice", (_GH + "27779",)),  # noqa: E501
    "sglang-24402": Listed("kvtrap.capture.bugs.sglang_24402", "fa3 EAGLE tree (topk > 1) speculative SWA page table holds untranslated full-pool ids", ("https://github.com/sgl-project/sglang/issues/24402", _GH + "24617")),  # noqa: E501
    "sglang-25805": Listed("kvtrap.capture.bugs.sglang_25805", "alloc_extend_swa_tail leaves stale full-to-SWA mappings: another request's SWA page freed", (_GH + "25805", _GH + "26078")),  # noqa: E501
    "sglang-24394": Listed("kvtrap.capture.bugs.sglang_24394", "triton deterministic (unified) extend appends untranslated full-pool ids for SWA layers", ("https://github.com/sgl-project/sglang/issues/24394", _GH + "24395")),  # noqa: E501
    "sglang-27737": Listed("kvtrap.capture.bugs.sglang_27737", "flashinfer decides SWA from the allocator, not the active pool: window layers planned with untranslated ids", (_GH + "27737", _GH + "27491")),  # noqa: E501
}


@dataclass(frozen=True)
class Bug:
    name: str
    title: str
    enable: Callable[[], None]
    disable: Callable[[], None]


def patching_bug(name: str, title: str, targets: list[Any]) -> Bug:
    """A bug re-introduced by wrapping SGLang methods (``targets``, :class:`kvtrap.capture.patching.MethodTarget`):
    enabling installs the wrappers, disabling removes them."""
    from kvtrap.capture.patching import install, uninstall

    return Bug(name, title, enable=lambda: install(targets), disable=lambda: uninstall(targets))


_enabled: list[str] = []


def get(name: str) -> Bug:
    """The entry for ``name`` (its module is imported here). Names come from a validated Config."""
    module = BUGS[name].module
    bug = importlib.import_module(module).BUG
    assert bug.name == name, f"{module}.BUG is named {bug.name!r}, listed as {name!r}"
    return bug


def sync(names: Iterable[str]) -> None:
    """Make exactly ``names`` enabled: enable the missing ones, disable the rest."""
    wanted = list(names)
    for name in wanted:
        if name not in _enabled:
            get(name).enable()
            _enabled.append(name)
    for name in [n for n in _enabled if n not in wanted]:
        get(name).disable()
        _enabled.remove(name)


def enabled() -> tuple[str, ...]:
    return tuple(_enabled)
