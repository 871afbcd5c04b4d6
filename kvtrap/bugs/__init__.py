"""Historical SGLang bugs kvtrap can re-introduce on purpose; see :mod:`kvtrap.inject`.

:data:`BUGS` is the explicit list (name -> the module that defines and registers the injection). It is
read without importing those modules (they need SGLang), so settings can refuse an unknown name at once.
"""

BUGS: dict[str, str] = {
    "sglang-26957": "kvtrap.bugs.sglang_26957",
}
