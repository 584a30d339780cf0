"""Files that a restart or another process reads: written whole under a temporary name, fsynced, renamed.

The implementation lives in edge/atomic.py (standard library only), shared with the device side.
"""

from edge.atomic import TMP_PREFIX, fsync_dir, fsync_file, temporary_name, write_atomic, write_new

__all__ = ["TMP_PREFIX", "fsync_dir", "fsync_file", "temporary_name", "write_atomic", "write_new"]
