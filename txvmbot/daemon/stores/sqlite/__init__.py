"""The SQLite job store, the writes held while the host's disk is full, and the data files' damage check."""
