"""Unit tests: Twisted doubles (Clock, MemoryReactor, StringTransport, iosim), real SQLite files, no servers."""
