"""Uncertainty scorers behind one interface (SSD, TD, SE, SEP, PCP)."""
