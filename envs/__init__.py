"""Gymnasium environments and evaluators for layer selection."""
