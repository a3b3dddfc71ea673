"""Schedules: pure functions of training progress (LR policies, batch-size schedules)."""
