"""The drain point: where SGLang waits for a step's results, kvtrap reads what its sync-free checks recorded.

SGLang 0.5.23's ``SchedulerBatchResultProcessor.process_batch_result_decode`` / ``_prefill`` begin by waiting for
the step (``result.copy_done.synchronize()``) before any token goes to a client. kvtrap reads, before that:

* the device guard's records (:func:`kvtrap.capture.hooks.device_guard.drain_all`; decode steps, which CUDA
  graphs replay), and
* the allocator checks' records in drain mode (:func:`kvtrap.capture.hooks.allocator.drain_findings`; decode and
  prefill results): after the step's ``copy_done`` every check enqueued before that step's forward has passed.

A finding is dumped and raised here, before this step's tokens reach a client (the faulty call may be a step or
two older). ``Scheduler.on_idle`` (SGLang's idle housekeeping) reads the allocator records once more, waiting for
them: the frees of a step's finished requests run after that step's drain, so without it a bad free at the end of
a burst would wait for the next request. Not drained: SGLang's other result paths (disaggregated prefill, dLLM);
use ``KVTRAP_ALLOCATOR_TRAP=call`` there.
"""

from __future__ import annotations

from typing import Any

from kvtrap.capture.hooks import allocator, device_guard
from kvtrap.capture.patching import MethodTarget
from kvtrap.capture.session import current

MODULE = "sglang.srt.managers.scheduler_components.batch_result_processor"
CLASS = "SchedulerBatchResultProcessor"
SCHEDULER_MODULE = "sglang.srt.managers.scheduler"


def _step_done(result: Any) -> None:
    """SGLang's own first step in these methods (``result.copy_done.synchronize()``), taken first: every check
    enqueued before this step's forward has then passed, so its record is read now, not a step later."""
    copy_done = getattr(result, "copy_done", None)
    if copy_done is not None:
        copy_done.synchronize()


def _before_decode_results(original: Any) -> Any:
    def process_batch_result_decode(self: Any, batch: Any, result: Any, *args: Any, **kwargs: Any) -> Any:
        session = current()
        if session is not None:
            _step_done(result)
            device_guard.drain_all(session, result, waited=True)  # _step_done waited on its copy_done
            allocator.drain_findings(session)
        return original(self, batch, result, *args, **kwargs)

    return process_batch_result_decode


def _before_prefill_results(original: Any) -> Any:
    def process_batch_result_prefill(self: Any, batch: Any, result: Any, *args: Any, **kwargs: Any) -> Any:
        session = current()
        if session is not None:
            _step_done(result)
            allocator.drain_findings(session)
        return original(self, batch, result, *args, **kwargs)

    return process_batch_result_prefill


def _when_idle(original: Any) -> Any:
    def on_idle(self: Any, *args: Any, **kwargs: Any) -> Any:
        session = current()
        if session is not None:
            allocator.drain_findings(session, wait=True)  # idle: a wait costs no step anything
        return original(self, *args, **kwargs)

    return on_idle


TARGETS = [
    MethodTarget(MODULE, CLASS, "process_batch_result_decode", _before_decode_results),
    MethodTarget(MODULE, CLASS, "process_batch_result_prefill", _before_prefill_results),
    MethodTarget(SCHEDULER_MODULE, "Scheduler", "on_idle", _when_idle),
]
