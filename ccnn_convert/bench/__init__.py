"""Cost of converted models relative to the original: time, memory, FLOPs, parameters, top-1."""

from .measure import *  # noqa: F401,F403
