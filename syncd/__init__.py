"""syncd: live two-way workspace sync between a local tree and a remote one."""

__version__ = "0.1.0"
# Bumped whenever the wire format changes incompatibly; checked in the handshake.
PROTOCOL_VERSION = 2
