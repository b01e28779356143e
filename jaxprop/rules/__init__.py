"""VJP rules, grouped by family. Importing this package registers them all."""

from jaxprop.rules import collectives, complex, control, conv, custom, decompositions, elementwise, fft, indexing, linalg, reductions, shard_map, sorting, special, structural, windows  # noqa: F401,E501
