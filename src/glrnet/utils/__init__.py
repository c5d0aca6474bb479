"""Small utilities shared by every layer of glrnet: seeding and atomic file writing."""
