"""slime backend package."""
