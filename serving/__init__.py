"""Engine builds and the paged, continuously batched runtime for offline batch inference."""
