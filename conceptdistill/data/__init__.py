"""Data sets: the embedded shapes world lives in `conceptdistill.world`; real data sets live here."""
