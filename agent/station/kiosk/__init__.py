"""The kiosk's local API and its page."""
