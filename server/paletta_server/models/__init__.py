"""Model registry (where each model comes from) and residency manager (what is loaded)."""
