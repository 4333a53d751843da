"""The demo model: a small text-to-image model trained here on procedural compositional scenes."""
