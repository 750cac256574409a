"""Pure tensor maths: spatial grids and warps, similarities, metrics, errors and plain configs (no files, no network)."""
