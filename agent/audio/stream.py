"""Audio sources for `open_source`: what the audio path (`infer` on audio, audio pipelines) reads.

Audio items go through the same item loop as frames (`agent.loop.run_items`).
"""

from __future__ import annotations

AUDIO_SOURCE_MODULES = ["agent.sources.audio"]
"""What `open_source` needs for audio: never the vision sources (they import OpenCV)."""
