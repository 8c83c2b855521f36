"""prioritizer package."""
