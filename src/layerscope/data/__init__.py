"""Calibration and evaluation data: embedded assets, corpus parsers, text sources, token windows, labelled sets."""
