"""Results app models."""
