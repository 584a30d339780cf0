"""The daemon's lifecycle: start, watch and stop the parts; systemd, liveness, reload, status, metrics."""
