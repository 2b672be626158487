"""The distillation pipeline behind `ssd-guard distill`."""
