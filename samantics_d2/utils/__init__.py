"""Small shared helpers: atomic file writes, cache folders, drawing."""
