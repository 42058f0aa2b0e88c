"""Tests of the station wing (agent/station)."""
