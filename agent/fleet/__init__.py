"""Operator side: `lepton-fleet` keygen, publish, deploy, rollback, status."""
