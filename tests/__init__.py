"""The suite, by wing (contract, station, central, drivers, interpret) and system tests."""
