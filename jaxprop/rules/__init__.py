"""VJP rules, grouped by family. Importing this package registers them all."""

from jaxprop.rules import control, custom, elementwise, linalg, reductions, structural  # noqa: F401
