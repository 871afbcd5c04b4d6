"""Historical SGLang bugs kvtrap can re-introduce on purpose; see :mod:`kvtrap.inject`."""
