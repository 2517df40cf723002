"""Evaluation of fine-tuning runs: metrics with patient-bootstrap intervals, by site and field strength.

Entry point: ``orthodiff.evaluation.report.run_evaluation(run_dir, out=None)``.
"""
