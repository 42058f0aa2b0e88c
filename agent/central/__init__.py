"""The registry side: store, MQTT loop, registry blobs, dashboard.

Imports contract, never station.
"""
