"""Calibration data: texts to token batches, and the inputs of the first decoder block."""
