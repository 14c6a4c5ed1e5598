"""The MQTT daemon (`edgernn serve`): config, codecs, MQTT, scheduler, persistence, metrics.

See docs/architecture.md, "The daemon", for how the modules fit together.
"""
