"""One graph rewrite per module; each returns how many places it changed."""
