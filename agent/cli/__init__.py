"""The face: argument parsing and one module per side. Nothing imports it."""
