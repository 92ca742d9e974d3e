"""OpenCV, imported once with its own logging turned down.

OpenCV and its FFmpeg backend print warnings straight to stderr (a camera that
is not there, a stream that timed out, a broken file); the agent reports those
itself in one line, so the libraries are told to keep quiet. Import `cv2` from here.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

import cv2

_LOG_LEVEL_ERROR = 2  # cv::utils::logging::LOG_LEVEL_ERROR

# The environment is read when OpenCV loads; if something imported it earlier, set the level directly
# (the function lives in a different place in different OpenCV releases).
for _set_level in (getattr(cv2, "setLogLevel", None), getattr(getattr(cv2, "utils", None), "setLogLevel", None),
                   getattr(getattr(getattr(cv2, "utils", None), "logging", None), "setLogLevel", None)):
    if callable(_set_level):
        _set_level(_LOG_LEVEL_ERROR)
        break

__all__ = ["cv2"]
