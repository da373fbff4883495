"""Measuring fullres itself, a leaf that nothing else imports: training-step speed and Figure 6's table
(`speed`), where a step's time goes (`breakdown`), and inference speed of the exported engines
(`inference`)."""
