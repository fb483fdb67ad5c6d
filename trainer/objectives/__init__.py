"""Training objectives: the SiT interpolant (`interpolant`)."""
