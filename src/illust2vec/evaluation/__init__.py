"""Evaluation shared by training and `i2v evaluate`: metrics, the one evaluator (predict a split, compute named
metrics) and calibration on top of it."""
