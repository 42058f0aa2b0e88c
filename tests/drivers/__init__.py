"""Tests of the drivers wing (agent/drivers)."""
