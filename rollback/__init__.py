"""rollback package."""
