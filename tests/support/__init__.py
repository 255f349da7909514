"""Real test peers started from Python."""
