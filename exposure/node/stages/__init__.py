"""Pipeline stages (ingest, compute, fan-out, journal, mirror) that a node's processes run.

The compute stage will run :func:`exposure.engine.kernel.apply_batch` over ring batches.
"""
