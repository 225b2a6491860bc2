"""Evaluation attacks (`registry`, `pgd`, `apgd`, `fab`, `square`, `autoattack`, ...); the training-time adversaries are
`fairbench.adversaries`."""
