"""Model compression for operators: float → int8/fp16/dynamic with measured trade-offs.

- `graph`: flatbuffer rewrites that make a float model as it comes quantizable (fp16 weights
  folded to float32, activations fused, orphans removed, a default signature added).
- `calibration`: calibration samples made by the agent's own preprocessing of real inputs.
- `quantize`: `lepton-fleet model quantize` on ai-edge-quantizer (the `compress` extra).
- `agreement`: how far a variant's answers are from the base's (classes, boxes, wake words).
- `compare`: `lepton-fleet model compare`: size, latency, agreement and op profile side by side.

Only `graph` and `quantize` need the `compress` extra (ai-edge-quantizer, ai-edge-litert);
`compare` needs just a runtime, so it works on the tflite-runtime lane too.
"""
