"""The daemon's public API: the AMP protocol clients speak, its server and client, and TLS."""
