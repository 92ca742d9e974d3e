"""Sample capture: the items a model was unsure about (and a random baseline), kept on the device for the
operator to pull, label and calibrate the next model with (docs/capture.md).

`agent.samples.sample_store` is the bounded on-disk store, `agent.samples.capturer` decides per item and
hands off to one writer thread, so capture never slows a pipeline's loop."""
