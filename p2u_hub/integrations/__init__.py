"""Bridges between p2u's core and other libraries; each module imports its library, so import them only when needed."""
