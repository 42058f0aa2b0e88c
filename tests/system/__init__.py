"""End-to-end tests across processes."""
