"""txvmbot: boot fresh machines, run smoke tests in them, always clean up."""

__version__ = "0.1.0"
__all__ = ["__version__"]
