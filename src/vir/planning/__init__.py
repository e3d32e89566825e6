"""Estimates made from a config alone, before anything loads: GPU memory per device (`memory.plan_memory`)."""
