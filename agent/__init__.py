"""Lepton Edge Agent: int8 LiteRT inference loops on edge boards, reporting over MQTT."""

__version__ = "0.1.0"
