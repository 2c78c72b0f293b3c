"""Test doubles run as CLI subcommands: the mock upstream and the reference backend. Never imported by the proxy."""
