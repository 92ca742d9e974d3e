"""OpenCV, imported once with its own logging turned down.

OpenCV and its FFmpeg backend print warnings straight to stderr (a camera that
is not there, a broken file); the agent reports those itself in one line, so
the libraries are told to keep quiet before they load. Import `cv2` from here.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
os.environ.setdefault("OPENCV_VIDEOIO_DEBUG", "0")

import cv2

__all__ = ["cv2"]
