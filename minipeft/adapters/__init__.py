"""Adapter methods: one module per method, a registry from config class to layer class."""
