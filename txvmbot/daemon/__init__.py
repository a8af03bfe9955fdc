"""The txvmbot daemon: an AMP API for clients, a scheduler, a store that
survives crashes, and a pool of worker processes that run the checks."""
