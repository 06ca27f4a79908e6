"""User tools around the engine: inspect, convert, bench, trace, energy."""
