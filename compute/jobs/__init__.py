"""Jobs: one job, one run, committed all or nothing."""
