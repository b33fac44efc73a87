"""The commands: each a thin translator from its command line to one library call."""
