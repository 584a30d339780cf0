"""Models out: the HTTP download API, the retained MQTT notice, the fleet's counts."""
