"""cinema_kernels: Pallas block-sparse attention (installed from the ``kernels/`` folder under this import name).

The folder is called ``kernels/`` as in the project layout, but it installs as ``cinema_kernels`` because the PyPI
package ``kernels`` already owns that import name. The kernels consume ``Mask.block_summary`` tiles (empty / partial
/ full) from ``cinema_jax.attention.masks``; ``cinema_jax.attention.dot_product_attention(implementation="pallas")``
will dispatch here. Not built yet: that implementation currently raises an error that says so.
"""
