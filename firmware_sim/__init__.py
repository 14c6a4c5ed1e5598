"""Simulated sensor devices that publish over MQTT like real firmware. Not built yet."""
