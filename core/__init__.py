"""What every package shares and nothing of ours is imported by: the error type users see and the per-block Profile."""
