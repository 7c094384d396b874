"""Drivers of xai-workers: the ``xai-audit`` command line and the Ray Data batch job.

- ``xai_audit.cli``: ``xai-audit run | layers | demo`` (``main()``).
- ``xai_audit.config``: ``JobConfig``, the settings of a run (flags and/or a YAML file).
- ``xai_audit.sources``: the input (Parquet or image files, local or S3) cut into shards, read and
  preprocessed.
- ``xai_audit.attribute``: the pipeline (read -> preprocess -> ``AttributionWorker`` actors ->
  atomic Parquet parts), resume, manifest, progress.
- ``xai_audit.output``: the output layout, atomic part files, the exactly-once scan.

The library (``xai_workers``) never imports Ray; these modules do.
"""
