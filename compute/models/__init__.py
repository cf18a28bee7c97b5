"""Models: the zoo (the embedded default), its grammar and tasks."""
