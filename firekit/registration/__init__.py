"""Registration as stages over normalised tensors (start, network, refinement, check) composed by the pipeline, which owns millimetres and files at its edge; fields, apply and cine."""
