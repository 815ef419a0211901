"""Devices and their twins: each device (franka, realsense, operator) beside its simulated and replayed twins."""
