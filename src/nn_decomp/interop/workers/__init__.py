"""Scripts that run in a foreign tool's own Python (nn_decomp.interop.bridge starts them as
`FOREIGN_PYTHON workers/<name>.py REQUEST_DIR`). There nn_decomp is not installed, so a worker imports
nothing of ours (tests/test_bridge.py checks it), only its tool, the libraries beside it and
`protocol` (this directory is the script's, so first on its sys.path: never name a worker after a
package it imports)."""
