"""Examples in: the MQTT feed, the wire format's checks, intake (commit, then acknowledge), folder import."""
