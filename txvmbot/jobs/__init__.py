"""Backend-neutral jobs that run on machines: the smoke check and the suite."""
