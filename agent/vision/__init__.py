"""Vision: frame preprocessing and image decoders. Imports OpenCV; the audio path never imports this."""
