"""hamgr."""
