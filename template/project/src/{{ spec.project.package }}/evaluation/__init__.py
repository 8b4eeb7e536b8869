"""Evaluation: metrics accumulated on the device (``metrics``), the loop (``evaluator``), the
paper's reported numbers (``paper``) and the Paper | Ours | Δ report (``report``)."""
