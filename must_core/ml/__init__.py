"""The MUST engine: pure torch/open_clip, no settings, database, storage or queue code."""
