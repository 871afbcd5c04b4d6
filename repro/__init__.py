"""Repro scenarios and the runner (installed as ``kvtrap.repro``)."""
