"""Small shared helpers: atomic file writes, dataclass configs, seeding."""
