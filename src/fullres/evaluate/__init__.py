"""Evaluation and figures: segmentation metrics as the field measures them (`metrics`), BraTS 2023
lesion-wise scores (`lesions`), and the paper's figures (`figures`)."""
