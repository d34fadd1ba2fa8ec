"""Adapters that plug axpo into other RL trainers (TRL, verl). Each lives in its own module and
imports its framework lazily; importing this package imports neither."""
