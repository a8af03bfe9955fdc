"""Scheduling: the scheduler clients drive (and the shared database's front end), backends' caps, drain and quarantine, the failures report, and upkeep."""
