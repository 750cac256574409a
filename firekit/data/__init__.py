"""Files and datasets: NIfTI/ITK I/O and atomic writes, pair sources and the network grid, augmentation, demo brains, phantoms, ACDC."""
