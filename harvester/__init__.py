"""harvester package."""
