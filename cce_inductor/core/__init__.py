"""Shared helpers of the op layer (the bottom layer: they import nothing above them).

* :mod:`.checks` — the one input check (public, local-shard and kernel-entry variants), the label-range
  check, tracing and DTensor tests;
* :mod:`.dtypes` — the op's arithmetic dtype and the autocast helpers;
* :mod:`.reduce` — per-token loss -> ``reduction``;
* :mod:`.settings` — the knobs of :mod:`cce_inductor.config`, read once per call into one object;
* :mod:`.errors` — the typed "kernel does not fit" condition.
"""
