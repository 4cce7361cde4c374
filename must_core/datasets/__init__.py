"""Dataset and artifact URIs: syntax + policy checks at submission, safe fetching at job start."""
