"""Perceive-IR training platform: the library every job, tool and test imports."""

__version__ = "0.1.0"
