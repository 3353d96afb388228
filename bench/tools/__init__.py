"""One-off measurement tools (sweeps, host-time profiles): experiments for what to ship next, not the bench."""
