"""Wire formats: one adapter per API turns bytes into the canonical request and a reply back into bytes."""
