"""Exceptions raised by cliplens.

Library code raises these; only ``cli.py`` turns them into one-line messages and exit codes.
Each message should say what went wrong *and* what to do about it.
"""

from __future__ import annotations


class CliplensError(Exception):
    """Base class: a problem the user can fix (bad input, missing file, wrong model)."""

    exit_code = 2


class DatasetError(CliplensError):
    """A data set is missing, unreadable or malformed."""


class ChecksumError(DatasetError):
    """A file's checksum does not match the official one."""


class UnsafePickleError(DatasetError):
    """A pickle asked for an object outside the allow-list."""


class ModelError(CliplensError):
    """A model name, checkpoint or weights file is unknown or unavailable."""


class StoreError(CliplensError):
    """An index folder is missing, incomplete, corrupt or incompatible."""


class IndexExistsError(StoreError):
    """A complete index of other settings is where a new one would go; it is kept unless a rebuild is asked for."""

    def __init__(self, index_dir, change: str):
        self.index_dir, self.change = index_dir, change
        super().__init__(f"{index_dir} already holds a complete index built with other settings ({change}); "
                         "it is kept as it is")


class ModelMismatchError(StoreError):
    """The index was built with another model than the one asked to query it."""


class QueryError(CliplensError):
    """A query is empty, malformed, or asks for an impossible k."""


class BackendError(CliplensError):
    """A vector index backend is unknown, misconfigured, unreachable, or was built for another index."""


class EngineError(CliplensError):
    """A distributed engine (Ray) cannot be reached or could not finish a job."""
