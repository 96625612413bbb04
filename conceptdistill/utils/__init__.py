"""Small helpers shared by all stages: atomic file writing, per-sample seeding, logging."""
