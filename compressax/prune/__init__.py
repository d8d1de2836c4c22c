"""Pruning masks: magnitude (layer/global), N:M, structured, random, schedules."""
__all__ = []
