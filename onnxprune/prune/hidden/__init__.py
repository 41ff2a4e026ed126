"""Hidden width of transformers (``--hidden``): the residual stream, its writers and readers, and how to slice it.

Why a stage module of its own: the stream is coupled through every LayerNormalization/RMSNorm, which the channel
rules rightly freeze (removing a channel changes the statistics of the others). Removing hidden width is therefore
a deliberate approximation with its own maths: stream.py finds the stream (pre- or post-LN), basis.py (pure numpy)
computes the basis it is sliced to (a PCA rotation for pre-LN, a channel selection for post-LN), apply.py rewrites
the graph for a given basis. The same rewrite with the full basis is an exact equivalent of the model: the tests
check it, and the pass uses it as the reference recovery fits against.
"""
