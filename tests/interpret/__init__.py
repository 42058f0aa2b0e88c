"""Tests of the interpret wing (agent/interpret)."""
