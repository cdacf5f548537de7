"""Small helpers shared by every layer: input checks, device facts, test utilities."""
