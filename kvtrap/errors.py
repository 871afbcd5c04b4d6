"""What a trap found (:class:`Violation`) and the exception that carries it (:class:`KVTrapError`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

# The kinds of violation kvtrap reports. Dumps carry the kind as a string; the explain rules key on it.
PAGE_TABLE_OUT_OF_RANGE = "page_table_out_of_range"  # a live page id outside [0, pages of the pool read)
INDEX_SPACE_MISMATCH = "index_space_mismatch"  # an SWA layer handed the full-pool table (or vice versa)
SWA_STATE_DRIFT = "swa_state_drift"  # backend SWA state cached at init disagrees with the live pool
SEQLENS_EXCEED_TABLE = "seqlens_exceed_table"  # cache_seqlens needs more pages than the table is wide
SWA_SLOT_OUT_OF_RANGE = "swa_slot_out_of_range"  # the allocator handed out an SWA slot outside the pool

KINDS = (
    PAGE_TABLE_OUT_OF_RANGE,
    INDEX_SPACE_MISMATCH,
    SWA_STATE_DRIFT,
    SEQLENS_EXCEED_TABLE,
    SWA_SLOT_OUT_OF_RANGE,
)


@dataclass(frozen=True)
class Violation:
    """One broken invariant, with the coordinates a person needs to find it.

    ``bound`` is exclusive and ``lower`` inclusive: a legal value ``v`` satisfies ``lower <= v < bound``.
    ``fatal`` says whether launching the kernel anyway would read or write out of bounds; non-fatal
    violations (index space, drift) are found before the ids grow large enough to fault.
    """

    kind: str
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

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["rows"] = list(self.rows)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Violation:
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
