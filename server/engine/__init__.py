"""adapterd."""
