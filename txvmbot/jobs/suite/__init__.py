"""``txvmbot suite``: a test suite fed to several fresh machines from one queue."""
