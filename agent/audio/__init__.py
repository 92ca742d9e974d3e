"""Audio: PCM conversion and WAV headers, microphone captures."""
