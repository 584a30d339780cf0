"""The demo and the test and benchmark tooling (a private broker, a feeder, data sets): never imported by the service."""
