"""What a trap found (:class:`Violation`) and the exception that carries it (:class:`KVTrapError`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from kvtrap.record.kinds import Kind


@dataclass(frozen=True)
class Overflow:
    """``details.overflow``: a row whose ``cache_seqlens`` needs more pages than the table is wide."""

    row: int
    needed_pages: int
    width: int
    rows: int  # rows that overflow


@dataclass(frozen=True)
class Details:
    """The kind-specific extras of ``violation.details`` that readers use (checked on read; others pass)."""

    expected_table: str | None = None
    handed_table: str | None = None
    drift: dict[str, str] | None = None
    overflow: Overflow | None = None
    full_index: int | None = None
    swa_page: int | None = None
    recorded: int | None = None
    dropped: int | None = None
    redirected_to: int | None = None
    entries_by_flag: dict[str, int] | None = None
    tables: list[str] | None = None
    first_flags: int | None = None
    owner_full_page: int | None = None  # free checks: the full page the freed SWA page was handed out with
    freed_full_pages: list[int] | None = None  # free checks: the full pages the free call releases (first few)


@dataclass(frozen=True)
class Violation:
    """One broken invariant, with the coordinates a person needs to find it.

    ``bound`` is exclusive and ``lower`` inclusive: a legal value ``v`` satisfies ``lower <= v < bound``.
    ``fatal`` says whether launching the kernel anyway would read or write out of bounds; non-fatal
    violations (index space, drift) are found before the ids grow large enough to fault.
    """

    kind: Kind | str  # a Kind; a kind this kvtrap does not know (a newer writer's) stays a string
    summary: str
    where: str = ""  # the hook that found it, e.g. "TRTLLMHAAttnBackend.forward_decode"
    layer_id: int | None = None
    layer_type: str | None = None  # "swa" or "full": the pool the layer really reads
    window: int | None = None
    table: str | None = None  # tensor name in the dump
    pool: str | None = None  # "swa" or "full"
    row: int | None = None
    column: int | None = None
    value: int | None = None
    lower: int | None = None
    bound: int | None = None
    count: int = 1
    rows: tuple[int, ...] = ()
    fatal: bool = True
    details: dict[str, Any] = field(default_factory=dict)

    # checked on read against these (see kvtrap.record.schema)
    __json_types__ = {"kind": str, "details": Details}

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", Kind.parse(str(self.kind)))

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["kind"] = str(self.kind)
        out["rows"] = list(self.rows)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Violation:
        """From a manifest's ``violation``; validate it first (:func:`kvtrap.record.schema.check_object`)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["rows"] = tuple(values.get("rows") or ())
        values["details"] = dict(values.get("details") or {})
        return cls(**values)

    def describe(self) -> str:
        """One readable paragraph: layer, pool, row, value, bound."""
        parts = [self.summary.rstrip(".") + "."]
        if self.layer_id is not None:
            layer = f"Layer {self.layer_id}"
            if self.layer_type:
                layer += f" ({self.layer_type.upper()}"
                layer += f", window {self.window})" if self.window is not None and self.window >= 0 else ")"
            parts.append(layer + (f" reads the {self.pool} pool." if self.pool else "."))
        if self.value is not None:
            loc = self.table or "value"
            if self.row is not None:
                loc += f" row {self.row}"
            if self.column is not None:
                loc += f", column {self.column}"
            if self.bound is None:  # an in-range value that is wrong for another reason (the summary says why)
                parts.append(f"First bad entry: {loc} holds {self.value}.")
            else:
                rng = f"[{self.lower if self.lower is not None else 0}, {self.bound})"
                parts.append(f"First bad entry: {loc} holds {self.value}, outside the valid range {rng}.")
        if self.count > 1:
            rows = f" in {len(self.rows)} row(s)" if self.rows and self.column is not None else ""
            parts.append(f"{self.count} bad entries{rows}.")
        return " ".join(parts)


class KVTrapError(RuntimeError):
    """Raised by an armed kvtrap before a bad page table or KV slot reaches a kernel.

    ``violation`` holds the structured finding, ``dump_path`` the dump directory (``None`` if none was
    written) and ``dump_error`` why the dump failed, when it did. A failed dump never hides the trap.
    """

    def __init__(
        self, violation: Violation, dump_path: Path | None = None, dump_error: str | None = None
    ) -> None:
        self.violation = violation
        self.dump_path = dump_path
        self.dump_error = dump_error
        super().__init__(self._message())

    def _message(self) -> str:
        text = f"kvtrap [{self.violation.kind}]"
        if self.violation.where:
            text += f" in {self.violation.where}"
        text += ": " + self.violation.describe()
        if self.violation.fatal:
            text += " kvtrap raised before anything used these ids."
        if self.dump_path is not None:
            text += f" Dump: {self.dump_path} (run `kvtrap dump explain {self.dump_path}`)."
        elif self.dump_error:
            text += f" The dump could not be written: {self.dump_error}."
        return text

    def __reduce__(self):  # keeps the exception picklable across multiprocessing boundaries
        return (self.__class__, (self.violation, self.dump_path, self.dump_error))
