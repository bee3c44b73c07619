"""local backend package."""
