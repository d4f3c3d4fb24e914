"""Storage: the SQLite database, its schema and migrations, runs, waits, admin tables,
blobs, file modes."""
