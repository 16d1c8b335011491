"""The engine-directory contract that the builder writes and the runtime reads."""
