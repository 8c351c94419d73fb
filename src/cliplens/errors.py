"""Exceptions raised by cliplens.

Library code raises these; only ``cli`` turns them into one-line messages and exit codes, and the web app into
4xx JSON errors. Each message says what went wrong *and* what to do about it, in words that fit every caller
("give an image or an item id"); which inputs would fix it travels as data (``fix``: input name -> the value to
give, or None for any), and each caller words those its own way (the CLI as flags: ``--image PATH``).
"""

from __future__ import annotations


class CliplensError(Exception):
    """Base class: a problem the user can fix (bad input, missing file, wrong model)."""

    exit_code = 2

    def __init__(self, *args, fix: dict[str, str | None] | None = None):
        super().__init__(*args)
        self.fix = dict(fix or {})  # input name -> value that fixes it (None: any value the user chooses)


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


class ForeignFolderError(StoreError):
    """An index folder was asked for in a folder that holds other things: cliplens never writes there."""

    def __init__(self, folder, entries: int):
        self.folder, self.entries = str(folder), entries
        super().__init__(f"{folder} is not empty ({entries} entries) and is not a cliplens index: nothing was "
                         "written; choose an empty or new folder for the index")


class IndexBusyError(StoreError):
    """Another process is writing this index right now."""

    def __init__(self, folder, pid: int | None, since: str | None):
        self.folder, self.pid, self.since = str(folder), pid, since
        who = f"process {pid}" if pid else "another process"
        super().__init__(f"index {folder} is being written by {who} since {since or 'an unknown time'}: "
                         "wait for it to finish")


class StoreSpaceError(StoreError):
    """The disk holding an index folder is full (ENOSPC): nothing previous was damaged."""

    def __init__(self, folder, need_bytes: int | None, free_bytes: int | None):
        self.folder, self.need_bytes, self.free_bytes = str(folder), need_bytes, free_bytes
        need = f"about {need_bytes / 1e6:.1f} MB" if need_bytes else "more space"
        free = f" ({free_bytes / 1e6:.1f} MB free)" if free_bytes is not None else ""
        super().__init__(f"not enough disk space in {folder}: this index needs {need}{free}; the previous index "
                         "there is unchanged: free some space or choose another folder")
