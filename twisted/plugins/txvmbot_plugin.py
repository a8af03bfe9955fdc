"""twistd's entry to txvmbot. Importing this does nothing but name the
module (txvmbot.tap) that twistd imports when someone runs the plugin
(seed 001: a plugin that imported the reactor here killed ampoule workers)."""

from twisted.application.service import ServiceMaker

txvmbot = ServiceMaker(
    "txvmbot",
    "txvmbot.tap",
    "Boot fresh machines, run smoke-test jobs in them, always clean up.",
    "txvmbot",
)
