"""The worker processes: the ampoule pool, the worker's side, the AMP protocol between them, and the bootstrap that starts a worker."""
