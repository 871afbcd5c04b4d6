"""The capture side: everything that runs inside an SGLang process and records what it finds.

Layers, bottom up (a module imports only from layers below it; tests/test_imports.py checks):

* :mod:`.session`: an armed session (frozen config, report = dump + raise/log) and :func:`current`;
* :mod:`.patching`: installing and removing wrappers on SGLang classes, also before SGLang imports them;
* :mod:`.checks`: tensor scans of page tables and slots (torch);
* :mod:`.sglang_view`: the one view of SGLang's objects (backend + layer + batch -> snapshot);
* :mod:`.verdict`: snapshot -> violation + context (used by the hooks and the weight-free repro);
* :mod:`.guard`: the device-side guard for CUDA graphs (Triton kernels, record, drain);
* :mod:`.hooks`: thin adapters around SGLang methods, one module per backend or allocator;
* :mod:`.bugs` / :mod:`.fixes`: historical bugs re-introduced on purpose / fixes applied by default;
* :mod:`.arming`: ``armed()`` and the plugin's process-wide arming, installing hooks and fixes.

Importing this package imports nothing heavy; torch comes with the modules that need it.
"""
