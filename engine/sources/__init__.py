"""Work sources: one adapter per scheduler protocol behind engine/sources/protocol.py."""
