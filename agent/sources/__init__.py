"""Where inputs come from: files, folders, globs, videos, cameras and streams (and audio, elsewhere)."""
