"""Traffic with ground truth: scenario files and the simulator that plays them (docs/scenarios.md)."""
