"""Tool-using agents on top of the serving runtime."""
