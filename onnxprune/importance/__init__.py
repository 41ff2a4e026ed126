"""Importance: how much each channel or weight matters, one criterion per module."""
