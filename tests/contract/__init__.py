"""Tests of the contract wing (agent/contract)."""
