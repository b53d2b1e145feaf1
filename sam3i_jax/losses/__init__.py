"""Training objectives: box utilities, Hungarian / one-to-many matching and the SAM 3 losses."""
