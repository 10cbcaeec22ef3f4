"""Which files are media, by extension: one table for the reader and the task-file checks. No heavy
imports, so task validation stays instant."""

from __future__ import annotations

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif"})
VIDEO_EXTENSIONS = frozenset({"mp4", "webm", "mkv", "mov", "avi"})


def media_kind(extension: str) -> str | None:
    """'image' / 'video' for a file extension (with or without the dot, any case), else None."""
    extension = extension.lower().lstrip(".")
    if extension in IMAGE_EXTENSIONS:
        return "image"
    if extension in VIDEO_EXTENSIONS:
        return "video"
    return None
