"""Evaluation: post-processing of SAM 3 outputs into scored detections."""
