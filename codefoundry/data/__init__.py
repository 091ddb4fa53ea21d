"""Data stage: read source files, filter, tokenize into memmap shards, and load packed rows."""
