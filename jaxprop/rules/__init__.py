"""VJP rules, grouped by family. Importing this package registers them all."""

from jaxprop.rules import complex, control, conv, custom, decompositions, elementwise, fft, indexing, linalg, reductions, sorting, special, structural, windows  # noqa: F401,E501
