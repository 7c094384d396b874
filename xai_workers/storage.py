"""Tiny helpers to read and write local paths, ``file://`` and ``s3://`` URIs through fsspec.

S3 goes through s3fs: credentials come from the standard AWS chain (environment, shared config and
credentials files, instance/container roles); the endpoint is, in order, the ``s3_endpoint``
argument, the process's endpoint set once by :func:`configure`, the ``AWS_ENDPOINT_URL``
environment variable, else AWS itself. Anything else fsspec knows (``gs://``, ``memory://``, ...)
works too, with default options.

One storage configuration per process: a driver calls :func:`configure` once with its
``--s3-endpoint`` (or None: ``$AWS_ENDPOINT_URL``, else AWS) and then calls every function here
without an endpoint; the processes it starts (Ray workers) get the same configuration from
:func:`worker_env`, set in their environment (a Ray ``runtime_env``).
"""

from __future__ import annotations

import os
from typing import IO

import fsspec
from fsspec.implementations.local import LocalFileSystem

_S3_PROTOCOLS = ("s3", "s3a")


def _protocol(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else "file"


#: The process's S3 endpoint, set by :func:`configure` (None: not configured, or AWS itself)
_ENDPOINT: str | None = None


def configure(s3_endpoint: str | None = None) -> str | None:
    """Set this process's storage configuration once: the S3 endpoint is ``s3_endpoint``
    (``--s3-endpoint``), else ``$AWS_ENDPOINT_URL``, else None (AWS). Every later call in this
    module without an ``s3_endpoint`` argument uses it. Returns the endpoint."""
    global _ENDPOINT
    _ENDPOINT = s3_endpoint or os.environ.get("AWS_ENDPOINT_URL") or None
    return _ENDPOINT


def worker_env() -> dict[str, str]:
    """The environment variables that give another process (a Ray worker) this process's
    storage configuration: ``{"AWS_ENDPOINT_URL": endpoint}`` when there is one, else ``{}``."""
    endpoint = resolve_s3_endpoint()
    return {"AWS_ENDPOINT_URL": endpoint} if endpoint else {}


def resolve_s3_endpoint(s3_endpoint: str | None = None) -> str | None:
    """The S3 endpoint URL to use: ``s3_endpoint``, else the configured one (:func:`configure`),
    else ``$AWS_ENDPOINT_URL``, else None (AWS)."""
    return s3_endpoint or _ENDPOINT or os.environ.get("AWS_ENDPOINT_URL") or None


def filesystem(
    uri: str | os.PathLike, s3_endpoint: str | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(fs, path)`` for ``uri``: an fsspec filesystem and the path inside it (no protocol).

    Local paths (relative ones are made absolute) and ``file://`` give a ``LocalFileSystem``;
    ``s3://`` / ``s3a://`` give an ``s3fs.S3FileSystem`` on the endpoint described in the module
    docstring, with the path as ``bucket/key``.
    """
    uri = os.fspath(uri)
    options = {}
    if _protocol(uri) in _S3_PROTOCOLS:
        endpoint = resolve_s3_endpoint(s3_endpoint)
        if endpoint:
            options["endpoint_url"] = endpoint
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path


def open_file(uri: str | os.PathLike, mode: str = "rb", *, s3_endpoint: str | None = None, **kw):
    """Open ``uri`` like ``open()`` (use it in a ``with``); ``kw`` go to ``fs.open`` (encoding...).

    Writing to a local path creates its missing parent folders (on S3 there are none to create).
    Missing files raise ``FileNotFoundError``.
    """
    fs, path = filesystem(uri, s3_endpoint)
    if isinstance(fs, LocalFileSystem) and any(c in mode for c in "wax"):
        fs.makedirs(fs._parent(path), exist_ok=True)
    f: IO = fs.open(path, mode, **kw)
    return f


def read_bytes(uri: str | os.PathLike, s3_endpoint: str | None = None) -> bytes:
    """The whole content of ``uri`` as bytes; ``FileNotFoundError`` if it does not exist.

    On S3 the object is read in one request (``max_concurrency=1``): s3fs reads objects larger
    than its block size (50 MiB) in concurrent range requests whose bodies it does not retry,
    so one connection dropped mid-download (weights of a large model) would fail the read; a
    single request is retried whole, with backoff (``tests/test_s3_faults.py``)."""
    fs, path = filesystem(uri, s3_endpoint)
    if _protocol(os.fspath(uri)) in _S3_PROTOCOLS:
        return fs.cat_file(path, max_concurrency=1)
    return fs.cat_file(path)


def pyarrow_filesystem(uri: str | os.PathLike, s3_endpoint: str | None = None):
    """``(pyarrow.fs.FileSystem, path)`` for ``uri``, for ``pyarrow.parquet`` / ``pyarrow.dataset``.

    Local paths get ``pyarrow.fs.LocalFileSystem``; everything else is the fsspec filesystem of
    :func:`filesystem` wrapped in ``pyarrow.fs.PyFileSystem(FSSpecHandler(fs))``, so S3 uses the
    same endpoint and credentials as the rest of this module.
    """
    import pyarrow.fs as pafs

    fs, path = filesystem(uri, s3_endpoint)
    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join_uri(uri: str | os.PathLike, *parts: str) -> str:
    """``uri`` with ``parts`` appended by ``/``, protocol kept: ``s3://b/out`` + ``x.json``."""
    out = os.fspath(uri).rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out
