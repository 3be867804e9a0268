"""lenscache: one model pass to a Zarr v3 activation store; fitting and analysis read the store."""

__version__ = "0.1.0"
