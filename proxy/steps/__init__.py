"""Pipeline steps, one concern per module; the pipeline knows none of them by name."""
