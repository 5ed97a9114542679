"""Benchmarks: speed and memory of the appliance next to real peers, measured in the same run."""
