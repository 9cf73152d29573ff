"""Command-line tools that build, verify and inspect WebDataset shard sets."""
