"""The embedded backend: SQLite files in WAL mode, one writer process, counts aggregated in place."""
