"""Subcommands of the ``awqkit`` command line that live in their own modules (each has ``register(subparsers)``)."""
