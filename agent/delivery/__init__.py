"""Model delivery over MQTT (DESIGN §6, docs/delivery.md): signed manifests, a resumable pull of
retained chunks, a content-addressed store, self-test, activation with probation and rollback."""
