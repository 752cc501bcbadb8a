"""Distributed execution: Ray Train driver, DeepSpeed ZeRO engines, sharded SAM, checkpoints, parallel export.

``driver.run(cfg)`` is what ``zsaq quantize`` calls with ``dist.launcher: ray``;
every worker runs ``worker.train_loop(cfg.model_dump())``. Modules:
``engines`` (comm setup, DeepSpeed configs, student/teacher engines), ``sam``
(which partition each ZeRO stage perturbs), ``game`` (the SAM-SGA step on
engines), ``checkpoint`` (save/resume through ``ray.train``), ``export``
(streamed per-rank shards).
"""
