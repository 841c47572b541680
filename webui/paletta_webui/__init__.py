"""Paletta web page."""
