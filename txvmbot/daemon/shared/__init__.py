"""Several daemons on one PostgreSQL database (``[daemon] store =
"postgresql://..."``): the shared job store, its events and the cleanup
journal, claims with leases, and takeover after a daemon dies."""
