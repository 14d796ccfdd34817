"""Sub-commands of `lungcad`; each module exposes ``register(subparsers)`` that adds its parser and sets
``func``."""
