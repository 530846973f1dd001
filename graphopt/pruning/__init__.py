"""Structured pruning's pieces, apart from the pass (graphopt.passes.prune) that runs them:
planning which units to keep, re-fitting the layers that read cut channels, choosing
widths by measured latency, and rewriting the program."""
