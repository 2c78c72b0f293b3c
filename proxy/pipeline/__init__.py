"""The request pipeline: the typed context, the step protocol, the runtime built from one policy file."""
