"""Calibration (paper § III): information flow per layer (eqs. 1-4), the schedule fit (eqs. 5-7), the
single-layer sensitivity sweep (Fig. 2A) and their figures. Built on the core only."""
