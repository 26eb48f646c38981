"""Where modules live: handles and the local store."""
