"""The FIRE network: G, F and T (nets), the model wired as the paper's Section 3.1, and every loss term."""
