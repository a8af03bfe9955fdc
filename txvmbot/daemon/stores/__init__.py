"""Where the daemon keeps jobs, events and the journal: SQLite (the embedded default) and PostgreSQL (several daemons on one database)."""
