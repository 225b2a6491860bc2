"""Built-in fairness-aware adversarial training methods (one plugin per file)."""
