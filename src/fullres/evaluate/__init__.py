"""Evaluation and figures: segmentation metrics as the field measures them (`metrics`), BraTS 2023
lesion-wise scores (`lesions`), what a prediction is scored against (`inputs`: labels and the label values
of WT / TC / ET), and the paper's figures (`figures`)."""
