"""Benchmarks of txvmbot against moto on loopback. Scripts, not tests."""
