"""The shared PostgreSQL database: connections off the reactor, schema, job store, journal, the running daemon's writes, upkeep's reads."""
