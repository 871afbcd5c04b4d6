"""SGLang #26957: the frozen-KV MTP draft backend resolves no SWA pool (filled in by the repro issue)."""
