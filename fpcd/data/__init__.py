"""Data sources: toy distributions with exact answers, and (later) physics datasets."""
