"""`minipeft audit`: verify and explain adapters and merged checkpoints (spec/audit.md).

Each audit is a function returning a plain dataclass report (report.py) whose `findings` name the file and
the tensor and say what to do, and whose `status` is the exit status of `minipeft audit <command>`.
Model folders are read a tensor at a time (files.py), so an audit needs memory for a few layers.
"""
from .adapter import AdapterReport, LayerRow, Spectrum, audit_adapter, spectrum
from .combine import CombineReport, LayerCheck, audit_combine
from .convert import ConvertReport, ConvertRow, audit_convert
from .diff import DiffReport, DiffSummary, LayerDiff, audit_diff
from .files import Checkpoint, read_adapter
from .merged import MergedReport, TensorCheck, audit_merged
from .report import Finding, Report

__all__ = ["audit_adapter", "AdapterReport", "LayerRow", "Spectrum", "spectrum", "audit_combine", "CombineReport", "LayerCheck", "audit_convert", "ConvertReport", "ConvertRow", "audit_diff", "DiffReport", "DiffSummary", "LayerDiff", "audit_merged", "MergedReport", "TensorCheck", "Finding", "Report", "Checkpoint", "read_adapter"]
