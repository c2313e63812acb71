"""featcache: extract frozen-backbone features once, train heads on the cache, export the whole model."""

__version__ = "0.1.0"
