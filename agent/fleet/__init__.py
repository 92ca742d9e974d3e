"""Operator side: `lepton-fleet` keygen, publish, deploy, rollback, status (commands.py), watch and cmd (live.py)."""
