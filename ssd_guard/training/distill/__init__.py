"""The distillation pipeline behind `ssd-guard distill`."""

#: The stages of `ssd-guard distill`, in order (kept here, free of heavy imports, so that
#: the command line can list them).
STAGES = ("prompts", "teacher", "labels", "embed", "features", "layers", "student")

__all__ = ["STAGES"]
