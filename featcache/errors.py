"""The one exception family users see; the CLI prints its message as one line and exits 1."""


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


class DamagedFileError(FeatcacheError, ValueError):
    """A file featcache wrote (cache, record, model) was edited, truncated or damaged since."""
