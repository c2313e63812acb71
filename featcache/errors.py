"""The one exception family users see; the CLI prints its message as one line and exits 1."""

import errno


class FeatcacheError(Exception):
    """Base class for every expected, user-facing error."""


class DataError(FeatcacheError, ValueError):
    """The image folder is missing, empty or not in the expected layout."""


class WeightsError(FeatcacheError, ValueError):
    """Backbone weights cannot be loaded or do not match the architecture."""


class CacheMismatchError(FeatcacheError, ValueError):
    """A cache was built with other settings, another format version or other weights."""


class IncompleteCacheError(FeatcacheError, RuntimeError):
    """A cache is still being written, or its writer was killed before it finished."""


class CacheLockedError(FeatcacheError, RuntimeError):
    """Another process is writing the same cache."""


class ImageTooLargeError(DataError):
    """An image has more pixels than the limit (``--max-pixels``); it was not decoded."""

    def __init__(self, message: str, pixels: int):
        super().__init__(message)
        self.pixels = pixels


class StorageError(FeatcacheError, OSError):
    """A file cannot be written: disk full, file-size limit, read-only or unwritable folder."""


_CAUSES = {
    errno.ENOSPC: "no space left on the device; free some space",
    errno.EDQUOT: "disk quota exceeded; free some space",
    errno.EFBIG: "file larger than the file-size limit (ulimit -f); raise the limit",
    errno.EROFS: "read-only file system; use another --cache-dir",
    errno.EACCES: "permission denied; make the folder writable or use another --cache-dir",
    errno.EPERM: "operation not permitted; make the folder writable or use another --cache-dir",
}


def storage_error(exc: OSError, path=None) -> StorageError:
    """One line for an I/O error: the file, the cause, what to do. Finished work is never deleted on
    such an error, so running the same command again resumes."""
    where = path or exc.filename or "a file"
    verb = "write" if exc.errno in _CAUSES else "access"
    cause = _CAUSES.get(exc.errno, exc.strerror or str(exc))
    name = errno.errorcode.get(exc.errno, exc.errno) if exc.errno is not None else type(exc).__name__
    return StorageError(f"Cannot {verb} {where}: {cause}; work already done is kept, run the same command again "
                        f"to resume. Received: {name}")


class DamagedFileError(FeatcacheError, ValueError):
    """A file featcache wrote (cache, record, model) was edited, truncated or damaged since."""
