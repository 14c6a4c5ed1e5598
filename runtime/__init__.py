"""The MQTT daemon (`edgernn serve`): config, codecs, scheduler, persistence, metrics. Not built yet."""
