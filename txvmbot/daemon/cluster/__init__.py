"""Several daemons on one PostgreSQL database: each daemon's lease and claims, takeover after one dies, and LISTEN/NOTIFY."""
