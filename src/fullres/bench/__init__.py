"""Measuring fullres itself: FLOPs (`flops`), training-step speed and Figure 6's table (`speed`), and
the training wall-time estimate (`timing`)."""
