"""Shared test helpers: real SGLang objects (sglang_world), trap scenarios on them (trapdumps), importing
SGLang's runtime (srt), golden renderings (golden) and stand-ins for a server and a benchmark (standins/).
Imported as ``helpers.<module>``: tests/conftest.py puts ``tests/`` on ``sys.path``."""
