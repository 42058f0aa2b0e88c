"""Tests of the central wing (agent/central)."""
