"""Training-time adversaries (`training`) and evaluation attacks (`registry`, `pgd`)."""
