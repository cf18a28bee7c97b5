"""Ground truth: models whose circuit is known by construction, and scores of discovered circuits against it."""
