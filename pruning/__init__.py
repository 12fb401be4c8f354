"""Model loading, calibration capture and the pruners (magnitude, Wanda, SparseGPT)."""
