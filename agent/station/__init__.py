"""Everything that runs on the Pi at the counter."""
