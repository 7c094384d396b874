"""Drivers of xai-workers: the ``xai-audit`` command line and the Ray Data batch job.

- ``jobs.cli``: ``xai-audit run | layers | demo`` (``main()``).
- ``jobs.config``: ``JobConfig``, the settings of a run (flags and/or a YAML file).
- ``jobs.sources``: the input (Parquet or image files, local or S3) cut into shards, read and
  preprocessed.
- ``jobs.attribute``: the pipeline (read -> preprocess -> ``AttributionWorker`` actors ->
  atomic Parquet parts), resume, manifest, progress.
- ``jobs.output``: the output layout, atomic part files, the exactly-once scan.

The library (``xai_workers``) never imports Ray; these modules do.
"""
